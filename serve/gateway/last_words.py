"""A replica's last words: its clients get a terminal error when its process dies.

A replica's process holds both the gateway and the engine's front end (DESIGN,
"Topology"), so when it dies (SIGKILL, the kernel's OOM killer, a crash in native code)
nothing is left to write the error event a stream should end with: its clients saw the
connection cut mid-stream, and a request whose idle connection HAProxy had reused got no
answer at all. This module gives each replica a keeper, a small process of its own
(`serve.gateway.last_words_keeper`) that holds a duplicate of every connection of the
replica's HTTP server and, when the replica's process is gone, answers on each one
what the replica would have: HTTP 502 with the JSON envelope of both dialects (3008,
`Retry-After: 1`, like HAProxy's own page) where nothing had been sent yet, and the
dialect's error event then `data: [DONE]` where a stream was under way.

The parts, in the replica's process:

- `LastWords` starts the keeper and hands it each connection (`register`, one `sendmsg`
  with the descriptor per connection, and one message when it ends);
- `LastWordsProtocol` (the replica's uvicorn protocol, with `HeaderDeadlineProtocol`'s
  deadline) registers every connection and puts its `Slot` in each request's scope;
- `LastWordsMarks` (the outermost of the server's middlewares, `serve.gateway.serve_http`)
  keeps the connection's byte in the shared map true: `FRESH` when a request arrives,
  `BUSY` around every write, an `EVENTS_*` state after a write of an event stream once
  the transport holds nothing unsent (the stream then stands at a chunk boundary in the
  kernel's hands), `IDLE` when the answer is complete.

Costs: per connection two control messages; per write two stores into the shared map and
a look at the transport's buffer. Nothing when no keeper runs (the proxy actor, tests).
A connection that ends is shut down before its descriptor is released (the keeper's
duplicate would otherwise keep the connection open after the server closed it).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import socket
import subprocess
import sys
from asyncio import Transport
from collections.abc import Callable
from typing import ClassVar, Final, Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve import sse
from serve.gateway.error_wire import Dialect, dialect_of, error_body, raw_error_response
from serve.gateway.header_deadline import HeaderDeadlineProtocol
from serve.gateway.header_deadline import install as install_protocol
from serve.gateway.last_words_keeper import State, pack_payloads
from serve.ingress_errors import replica_gone

log = logging.getLogger(__name__)

# Why a connection went without: every slot taken, the keeper's socket full (it is
# behind), or the keeper gone.
UnprotectedReason = Literal["slots_full", "keeper_busy", "keeper_gone"]
SLOT_EXTENSION: Final = "batchserve.last_words"
DEFAULT_SLOTS: Final = 8192  # connections one replica can hold answers for
_EVENT_STATES: Final = {
    Dialect.WORKERS_AI: State.EVENTS_WORKERS_AI,
    Dialect.OPENAI: State.EVENTS_OPENAI,
}


def answers() -> tuple[bytes, bytes, bytes]:
    """What the keeper writes: the full 502 response, then each dialect's stream tail."""
    err = replica_gone()
    workers_ai = sse.event({"response": "", **error_body(err, Dialect.WORKERS_AI)}) + sse.DONE
    openai = sse.event(error_body(err, Dialect.OPENAI)) + sse.DONE
    return raw_error_response(err), workers_ai, openai


# What sending to the keeper fails with once it is gone (anything else passes).
_KEEPER_GONE: Final = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ECONNREFUSED, errno.ENOTCONN})
_RELEASED: Final = object()  # the owner of a slot whose connection ended: nobody's


class Slot:
    """One connection's byte in the shared map. Only the request that owns it writes it:
    the app of an earlier request on the connection may still run after its response
    (background work, Serve's hop back from the user-code thread), and after the
    connection ended its index goes to another connection."""

    __slots__ = ("_states", "fd", "index", "inode", "owner", "transport")

    def __init__(self, index: int, transport: Transport, fd: int, states: mmap.mmap) -> None:
        self.index = index
        self.transport = transport
        self.fd = fd
        self.inode = os.fstat(fd).st_ino  # to know the socket again (descriptors are reused)
        self.owner: object = None
        self._states = states

    def claim(self, owner: object, state: State) -> None:
        """A new request on this connection: it owns the byte from now on."""
        if self.owner is not _RELEASED:
            self.owner = owner
            self._states[self.index] = state

    def mark(self, owner: object, state: State) -> None:
        if self.owner is owner:
            self._states[self.index] = state

    def release(self) -> None:
        """The connection ended: nobody writes its byte any more."""
        self.owner = _RELEASED

    def flushed(self) -> bool:
        """Whether every byte written so far is in the kernel's hands."""
        return self.transport.get_write_buffer_size() == 0


class LastWords:
    """The replica's side of the keeper: the process, the shared map, the free slots."""

    def __init__(self, slots: int = DEFAULT_SLOTS) -> None:
        self.slots = slots
        # Told of every connection that goes without (the replica's metrics).
        self.on_unprotected: Callable[[UnprotectedReason], None] = lambda reason: None
        self._free: list[int] = []
        self._states: mmap.mmap | None = None
        self._control: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._full_logged = False
        self._gone = False

    def start(self) -> bool:
        """Start the keeper (after the engine's processes were forked: they would inherit
        the control socket otherwise). False, with a warning, where it cannot run (it needs
        Linux's memfd and SOCK_SEQPACKET): the replica then serves without it."""
        try:
            self._start()
        except (OSError, AttributeError) as exc:
            log.warning("last words: no keeper on this system (%s); a replica that dies "
                        "cuts its clients' connections", exc)  # fmt: skip
            return False
        return True

    def _start(self) -> None:
        map_fd = os.memfd_create("batchserve-last-words")
        os.ftruncate(map_fd, self.slots)
        self._states = mmap.mmap(map_fd, self.slots)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "serve.gateway.last_words_keeper", str(os.getpid()),
                 str(theirs.fileno()), str(map_fd), str(self.slots)],
                pass_fds=(theirs.fileno(), map_fd), stdin=subprocess.DEVNULL,
            )  # fmt: skip
        finally:
            theirs.close()
            os.close(map_fd)
        ours.sendall(pack_payloads(*answers()))
        ours.setblocking(False)  # never block the event loop: a full socket skips a message
        self._control = ours
        self._free = list(range(self.slots - 1, -1, -1))

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def register(self, transport: Transport) -> Slot | None:
        """Hand the keeper this connection; None if it cannot take it (nothing is lost
        but the answer on this connection should the process die)."""
        if self._control is None or self._states is None:
            if self._gone:
                self.on_unprotected("keeper_gone")
            return None
        if not self._free:
            if not self._full_logged:
                log.warning("last words: all %d slots taken; new ones go without", self.slots)
                self._full_logged = True
            self.on_unprotected("slots_full")
            return None
        sock = transport.get_extra_info("socket")
        if sock is None:
            return None
        index = self._free.pop()
        self._states[index] = State.IDLE
        try:
            slot = Slot(index, transport, sock.fileno(), self._states)
            socket.send_fds(self._control, [b"R" + index.to_bytes(4, "big")], [slot.fd])
        except OSError as exc:
            self._free.append(index)
            if exc.errno not in _KEEPER_GONE:  # behind, or short of buffers: this one goes
                self.on_unprotected("keeper_busy")  # without, the next may not
                return None
            log.error("last words: the keeper is gone (%s); connections go without", exc)
            self._control.close()
            self._control, self._gone = None, True
            self.on_unprotected("keeper_gone")
            return None
        return slot

    def release(self, slot: Slot) -> None:
        """The connection ended: make sure its end reaches the peer, then free the slot."""
        slot.release()
        if self._states is not None:
            self._states[slot.index] = State.IDLE
        _shut_down(slot)
        if self._control is not None:
            # Lost (the keeper's socket full): it closes its copy when the slot is taken again.
            with contextlib.suppress(OSError):
                self._control.send(b"U" + slot.index.to_bytes(4, "big"))
        self._free.append(slot.index)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the keeper without last words (a normal stop)."""
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._process is not None:
            try:
                self._process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None


def _shut_down(slot: Slot) -> None:
    """End the connection for the peer: the keeper's duplicate would keep it open after
    the server closed it. Through the descriptor (uvloop's transport sockets have no
    `shutdown`), and only if it still is this connection's socket."""
    try:
        if os.fstat(slot.fd).st_ino != slot.inode:
            return
        sock = socket.socket(fileno=slot.fd)
    except OSError:
        return  # closed already
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # the peer ended it already
    finally:
        sock.detach()


class LastWordsProtocol(HeaderDeadlineProtocol):
    """The replica's uvicorn protocol: the header deadline, and every connection handed
    to the keeper."""

    # Process-wide, like the uvicorn protocol table `install` edits.
    keeper: ClassVar[LastWords | None] = None

    _slot: Slot | None = None

    def connection_made(self, transport: Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.keeper is not None:
            self._slot = self.keeper.register(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._slot is not None and self.keeper is not None:
            self.keeper.release(self._slot)
            self._slot = None
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        if self._slot is not None:
            # An ASGI extension's value is a dict.
            self.scope.setdefault("extensions", {})[SLOT_EXTENSION] = {"slot": self._slot}
        super().on_headers_complete()


def install(keeper: LastWords, header_timeout_s: float) -> None:
    """Make `LastWordsProtocol`, with this keeper and header timeout, the HTTP protocol of
    the uvicorn servers this process starts from now on."""
    LastWordsProtocol.keeper = keeper
    install_protocol(header_timeout_s, LastWordsProtocol)


class LastWordsMarks:
    """ASGI middleware on the server's real `send`: keeps the connection's state byte
    true for the keeper."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        extension = scope.get("extensions", {}).get(SLOT_EXTENSION)
        slot = extension.get("slot") if scope["type"] == "http" and extension else None
        if not isinstance(slot, Slot):
            await self.app(scope, receive, send)
            return
        events = _EVENT_STATES[dialect_of(scope["path"])]
        boundary = State.BUSY  # what this response's boundaries allow the keeper
        answered = False
        me = object()  # this request, as the slot's owner

        async def marked(message: Message) -> None:
            nonlocal boundary, answered
            if message["type"] == "http.response.start":
                boundary = events if _chunked_events(scope, message) else State.BUSY
            slot.mark(me, State.BUSY)
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                answered = True
                slot.mark(me, State.IDLE)
            elif slot.flushed():
                slot.mark(me, boundary)

        # A full 502 only where it is one: not after HEAD (no body), nor behind the
        # unsent tail of a pipelined request's answer.
        fresh = scope["method"] != "HEAD" and slot.flushed()
        slot.claim(me, State.FRESH if fresh else State.BUSY)
        try:
            await self.app(scope, receive, marked)
        finally:  # unanswered, the server writes its 500 or closes: the keeper adds nothing
            slot.mark(me, State.IDLE if answered else State.BUSY)


def _chunked_events(scope: Scope, start: Message) -> bool:
    """An event stream that uvicorn writes in chunks (no length, a body allowed)."""
    if scope["method"] == "HEAD" or start["status"] in (204, 304):
        return False
    headers = {name.lower(): value for name, value in start.get("headers", [])}
    if b"content-length" in headers:
        return False
    content_type: bytes = headers.get(b"content-type", b"")
    return content_type.startswith(b"text/event-stream")
