"""The keeper of a replica's last words: a small process that answers for the replica's
HTTP connections when the replica's process dies (`serve.gateway.last_words`).

Run by the replica as `python -m serve.gateway.last_words_keeper PARENT_PID CONTROL_FD
MAP_FD SLOTS`; standard library only, so it starts in a few tens of milliseconds and
holds little memory. It keeps a duplicate of every open connection of the replica's HTTP
server (received over the control socket, SCM_RIGHTS) and reads, for each, one byte of a
shared map the server writes as it answers (`State`). The duplicate also keeps a
connection open when the replica's process dies, which is what lets this process write
on it. When the parent is gone, it writes, on every connection whose state allows it:

- `FRESH` (a request came, nothing of its answer was sent), or `IDLE` with a request the
  dead server never read: a complete HTTP 502 response with the JSON envelope of both
  dialects, `Connection: close`;
- `EVENTS_*` (a chunked event stream, every byte written so far in the kernel's hands, so
  the stream stands at a chunk boundary): one chunk holding the dialect's error event and
  `data: [DONE]`, then the chunked body's end;

then ends the connection, reading until the peer closes (a lingering close: closing with
unread bytes would reset the connection and could discard the answer). Any other state
(idle between requests with nothing unread, a body half written) is closed as the dead
process would have closed it. A connection whose socket cannot take the answer at once (a
client that stopped reading) is closed too. The whole takes at most `DEADLINE_S`.

The parent is gone once every thread of its process is on its way out (`dying`, read from
/proc every `WATCH_S`): its main thread has exited and each one left is exiting or has
SIGKILL pending. The process only ends (its pidfd becomes readable, its files close)
after its last thread has freed its memory, which on a busy machine takes seconds: a
replica of 700 MB killed beside two busy processes on 2 vCPUs ended 1.9-3.2 s after the
kill, its threads were all doomed within 20 ms. The pidfd stays as the backstop; without
pidfds, the control socket's end and a new parent process tell.

When the parent closes the control socket and stays alive (a normal stop), it exits
without writing anything. When it died, the keeper ends what is left of the replica's own
process group, if it leads one (`end_group`).

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
WATCH_S = 0.05  # how often the parent's threads are looked at (about 30 µs a look)
PF_EXITING = 0x4  # a task's flag once it is in do_exit (include/linux/sched.h)
_SIGKILL = 1 << (signal.SIGKILL - 1)  # its bit in /proc's pending-signal masks
# After the control socket's end-of-file, how long to wait for the parent to be gone
# before taking the close as a normal stop (the kernel closes a dying process's files
# before it reports the process gone).
EXIT_GRACE_S = 1.0
_U32 = struct.Struct("!I")
_LENGTHS = struct.Struct("!III")
_MAX_MESSAGE = 1 << 16


class State(enum.IntEnum):
    """One byte per connection in the shared map, written by the replica's server."""

    IDLE = 0  # no request under way: closed as is (a FRESH answer if one came unread)
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
            conn.setblocking(False)
            state = self.states[slot]
            if state == State.IDLE and _unread_request(conn):
                state = State.FRESH  # a request came that the dead server never read
            answer = self.answers.get(state)
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


def _unread_request(conn: socket.socket) -> bool:
    try:
        return bool(conn.recv(1, socket.MSG_PEEK))
    except OSError:
        return False


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


def _task(path: str) -> tuple[str, int] | None:
    """A task's state letter and flags from its /proc `stat`; None once it is gone."""
    try:
        with open(path, "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()  # after "pid (comm) "
    return fields[0].decode(), int(fields[6])


def _doomed(task: str) -> bool:
    """Whether the task under /proc dir `task` is gone, exiting, or about to (SIGKILL
    pending: it never returns to its program)."""
    found = _task(f"{task}/stat")
    if found is None or found[0] in "ZX" or found[1] & PF_EXITING:
        return True
    try:
        with open(f"{task}/status", "rb") as f:
            status = f.read()
    except OSError:
        return True
    for line in status.splitlines():
        if line.startswith((b"SigPnd:", b"ShdPnd:")) and int(line.split()[1], 16) & _SIGKILL:
            return True
    return False


def dying(parent: int, proc: str = "/proc") -> bool:
    """Whether no thread of process `parent` will run its program again: its main thread
    has exited and every other one is doomed. False where /proc cannot tell (the pidfd
    then does)."""
    base = f"{proc}/{parent}"
    leader = _task(f"{base}/stat")
    if leader is None or not (leader[0] in "ZX" or leader[1] & PF_EXITING):
        return False
    try:
        tasks = os.listdir(f"{base}/task")
    except OSError:
        return False
    return all(_doomed(f"{base}/task/{tid}") for tid in tasks)


def _gone(parent: int, pidfd: int | None, within_s: float) -> bool:
    """Whether `parent` ends within `within_s`."""
    if pidfd is not None:
        return bool(select.select([pidfd], [], [], within_s)[0])
    deadline = time.monotonic() + within_s
    while os.getppid() == parent and not dying(parent):  # orphans go to another process
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
        look_at = time.monotonic() + WATCH_S
        while True:
            events = sel.select(WATCH_S)
            if any(key.data == "parent" for key, _ in events):
                break
            if time.monotonic() >= look_at:
                if dying(parent):
                    break
                look_at = time.monotonic() + WATCH_S
            if not events:
                continue
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
    # Where the replica leads a process group of its own (Ray gives each worker one), the
    # group is the replica's: its engine's processes. This process leaves it, so that Ray's
    # end of the group (SIGTERM, SIGKILL 0.2 s later, once it notices the worker gone) does
    # not cut the last words short, and ends the group after them.
    group = parent if os.getpgrp() == parent else None
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    control = socket.socket(fileno=control_fd)
    states = mmap.mmap(map_fd, slots)
    os.close(map_fd)
    outcome = run(parent, control, states)
    if outcome != "stopped":
        if group is not None:
            end_group(group)
            outcome += f"; ended its process group {group}"
        print(f"batchserve last words: {outcome}", file=sys.stderr, flush=True)
    return 0


def end_group(group: int) -> None:
    """SIGKILL what is left of the dead replica's process group. An engine whose front end
    died serves nobody, yet vLLM's EngineCore does not watch its parent: Ray's raylet ends
    the group when it notices the worker gone, and where it could not (its daemons stopped
    first), an EngineCore and its worker were seen running 10 minutes after their replica's
    SIGKILL, holding their memory."""
    with contextlib.suppress(OSError):
        os.killpg(group, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
