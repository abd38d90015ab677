"""The keeper of a replica's last words: a small process that answers for the replica's
HTTP connections when the replica's process dies (`serve.gateway.last_words`).

Run by the replica as `python -m serve.gateway.last_words_keeper PARENT_PID CONTROL_FD
MAP_FD SLOTS`; standard library only, so it starts in a few tens of milliseconds and
holds little memory. It keeps a duplicate of every open connection of the replica's HTTP
server (received over the control socket, SCM_RIGHTS) and reads, for each, one byte of a
shared map the server writes as it answers (`State`). The duplicate also keeps a
connection open when the replica's process dies, which is what lets this process write
on it. When the parent is gone (its pidfd becomes readable; without pidfds, the control
socket's end and a new parent process tell), it writes, on every
connection whose state allows it:

- `FRESH` (a request came, nothing of its answer was sent): a complete HTTP 502 response
  with the JSON envelope of both dialects, `Connection: close`;
- `EVENTS_*` (a chunked event stream, every byte written so far in the kernel's hands, so
  the stream stands at a chunk boundary): one chunk holding the dialect's error event and
  `data: [DONE]`, then the chunked body's end;

then ends the connection, reading until the peer closes (a lingering close: closing with
unread bytes would reset the connection and could discard the answer). Any other state
(idle between requests, a body half written) is closed as the dead process would have
closed it. A connection whose socket cannot take the answer at once (a client that stopped
reading) is closed too. The whole takes at most `DEADLINE_S`.

When the parent closes the control socket and stays alive (a normal stop), it exits
without writing anything.

Control messages (one per datagram, SOCK_SEQPACKET): `P` + three big-endian u32 lengths +
the FRESH response + the Workers AI tail + the OpenAI tail (first, once); `R` + u32 slot
with one file descriptor (a new connection in that slot); `U` + u32 slot (the connection
ended).
"""

from __future__ import annotations

import array
import contextlib
import enum
import mmap
import os
import resource
import select
import selectors
import signal
import socket
import struct
import sys
import time

DEADLINE_S = 2.0
# After the control socket's end-of-file, how long to wait for the parent to be gone
# before taking the close as a normal stop (the kernel closes a dying process's files
# before it reports the process gone).
EXIT_GRACE_S = 1.0
_U32 = struct.Struct("!I")
_LENGTHS = struct.Struct("!III")
_MAX_MESSAGE = 1 << 16


class State(enum.IntEnum):
    """One byte per connection in the shared map, written by the replica's server."""

    IDLE = 0  # no request, or nothing this process may add: closed as is
    FRESH = 1  # a request, nothing of its answer sent
    EVENTS_WORKERS_AI = 2  # a Workers AI event stream at a chunk boundary
    EVENTS_OPENAI = 3  # an OpenAI event stream at a chunk boundary
    BUSY = 4  # a write under way, or a body that is not an event stream


def chunk(data: bytes) -> bytes:
    """`data` as one chunk of a chunked HTTP/1.1 body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


END_OF_CHUNKS = b"0\r\n\r\n"


def pack_payloads(fresh: bytes, workers_ai_tail: bytes, openai_tail: bytes) -> bytes:
    """The `P` message."""
    lengths = _LENGTHS.pack(len(fresh), len(workers_ai_tail), len(openai_tail))
    return b"P" + lengths + fresh + workers_ai_tail + openai_tail


def unpack_payloads(message: bytes) -> dict[int, bytes]:
    """What to write for each state that gets an answer."""
    sizes = _LENGTHS.unpack_from(message, 1)
    parts, at = [], 1 + _LENGTHS.size
    for size in sizes:
        parts.append(message[at : at + size])
        at += size
    fresh, workers_ai, openai = parts
    return {
        State.FRESH: fresh,
        State.EVENTS_WORKERS_AI: chunk(workers_ai) + END_OF_CHUNKS,
        State.EVENTS_OPENAI: chunk(openai) + END_OF_CHUNKS,
    }


class Keeper:
    """The connections held, and what to write on them."""

    def __init__(self, states: mmap.mmap) -> None:
        self.states = states
        self.held: dict[int, socket.socket] = {}
        self.answers: dict[int, bytes] = {}  # by state

    def handle(self, message: bytes, fds: list[int]) -> None:
        kind = message[:1]
        if kind == b"P":
            self.answers = unpack_payloads(message)
        elif kind == b"R" and fds:
            slot = _U32.unpack_from(message, 1)[0]
            self.drop(slot)
            self.held[slot] = socket.socket(fileno=fds.pop(0))
        elif kind == b"U":
            self.drop(_U32.unpack_from(message, 1)[0])
        for fd in fds:  # never keep a descriptor nobody asked for
            os.close(fd)

    def drop(self, slot: int) -> None:
        held = self.held.pop(slot, None)
        if held is not None:
            held.close()

    def last_words(self) -> tuple[int, int]:
        """Answer every connection its state allows, end them all; (answered, closed)."""
        deadline = time.monotonic() + DEADLINE_S
        answered, ending = 0, []
        for slot, conn in self.held.items():
            answer = self.answers.get(self.states[slot])
            conn.setblocking(False)
            if answer is not None and _send_at_once(conn, answer):
                answered += 1
            try:
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                conn.close()
                continue
            ending.append(conn)
        _linger(ending, deadline)
        closed = len(self.held)
        self.held.clear()
        return answered, closed


def _send_at_once(conn: socket.socket, data: bytes) -> bool:
    try:
        return conn.send(data) == len(data)
    except OSError:
        return False


def _linger(conns: list[socket.socket], deadline: float) -> None:
    """Read (and drop) what the peers still send until each closes, or the deadline."""
    by_fd = {conn.fileno(): conn for conn in conns}
    with selectors.DefaultSelector() as sel:
        for conn in conns:
            sel.register(conn, selectors.EVENT_READ)
        while sel.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(left):
                conn = by_fd[key.fd]
                try:
                    more = conn.recv(_MAX_MESSAGE)
                except OSError:
                    more = b""
                if not more:
                    sel.unregister(conn)
                    conn.close()
    for conn in conns:
        conn.close()


def _receive(control: socket.socket) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    message, ancillary, _, _ = control.recvmsg(_MAX_MESSAGE, socket.CMSG_SPACE(fds.itemsize))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return message, list(fds)


def _drain(control: socket.socket, keeper: Keeper) -> None:
    control.setblocking(False)
    while True:
        try:
            message, fds = _receive(control)
        except OSError:  # nothing more queued
            return
        if not message:
            return
        keeper.handle(message, fds)


def _pidfd(parent: int) -> int | None:
    """A descriptor that becomes readable when `parent` ends; None where the system refuses
    one (a seccomp profile without pidfd_open): the control socket's end then tells."""
    try:
        return os.pidfd_open(parent)
    except OSError:
        return None


def _gone(parent: int, pidfd: int | None, within_s: float) -> bool:
    """Whether `parent` ends within `within_s`."""
    if pidfd is not None:
        return bool(select.select([pidfd], [], [], within_s)[0])
    deadline = time.monotonic() + within_s
    while os.getppid() == parent:  # orphans are handed to another process
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def run(parent: int, control: socket.socket, states: mmap.mmap) -> str:
    """Serve the control socket until the parent goes; return what happened."""
    pidfd = _pidfd(parent)
    keeper = Keeper(states)
    with selectors.DefaultSelector() as sel:
        sel.register(control, selectors.EVENT_READ, "control")
        if pidfd is not None:
            sel.register(pidfd, selectors.EVENT_READ, "parent")
        while True:
            events = sel.select()
            if any(key.data == "parent" for key, _ in events):
                break
            message, fds = _receive(control)
            if not message:  # the parent closed its end: gone, or a normal stop?
                if _gone(parent, pidfd, EXIT_GRACE_S):
                    break
                return "stopped"
            keeper.handle(message, fds)
    _drain(control, keeper)  # what the parent sent just before it died
    answered, closed = keeper.last_words()
    return f"parent {parent} died: answered {answered} of its {closed} open connections"


def main(argv: list[str]) -> int:
    # A terminal's Ctrl-C or a stop's SIGTERM to the process group is for the replica; this
    # process leaves when the replica does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Room for a duplicate of every connection the replica may hand over (beyond its limit
    # the kernel would drop a passed descriptor).
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):  # an unlimited hard limit: keep ours
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    parent, control_fd, map_fd, slots = (int(a) for a in argv[1:5])
    control = socket.socket(fileno=control_fd)
    states = mmap.mmap(map_fd, slots)
    os.close(map_fd)
    outcome = run(parent, control, states)
    if outcome != "stopped":
        print(f"batchserve last words: {outcome}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
