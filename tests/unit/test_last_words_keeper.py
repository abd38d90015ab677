"""The keeper of a replica's last words on its own (serve/gateway/last_words_keeper.py):
real sockets, a real parent process killed. What each connection gets depends on the
state byte its server left: a full 502 envelope, the stream's error event and its end,
or a plain close; and a normal stop writes nothing."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import psutil
import pytest
from fastapi.testclient import TestClient

from serve.cluster import build_gateway
from serve.gateway import last_words_keeper
from serve.gateway.last_words import SLOT_EXTENSION, LastWords, LastWordsMarks, Slot, answers
from serve.gateway.last_words_keeper import (
    DEADLINE_S,
    END_OF_CHUNKS,
    State,
    chunk,
    pack_payloads,
    run,
)
from tests.fakes import FakeEngine
from tests.gateway.conftest import gateway_settings


class Run:
    """`run` in a thread, watching a `sleep` process as its parent."""

    def __init__(self, watched: int | None = None) -> None:
        self.parent = subprocess.Popen(["sleep", "60"])
        parent = self.parent.pid if watched is None else watched
        self.states = mmap.mmap(-1, 16)
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.outcome: list[str] = []
        self.thread = threading.Thread(
            target=lambda: self.outcome.append(run(parent, theirs, self.states))
        )
        self.thread.start()
        self.control.sendall(pack_payloads(*answers()))
        self.peers: dict[int, socket.socket] = {}

    def connection(self, slot: int, state: State) -> socket.socket:
        """A connection the keeper holds in `slot`; returns the client's end."""
        server, client = socket.socketpair()
        socket.send_fds(self.control, [b"R" + slot.to_bytes(4, "big")], [server.fileno()])
        server.close()  # the dead server's copy: only the keeper's remains
        self.states[slot] = state
        client.settimeout(5)
        self.peers[slot] = client
        return client

    def finish(self) -> str:
        self.thread.join(10)
        assert not self.thread.is_alive()
        return self.outcome[0]

    def close(self) -> None:
        self.parent.kill()
        self.parent.wait()
        self.control.close()
        self.thread.join(10)
        for peer in self.peers.values():
            peer.close()


@pytest.fixture
def keeper_run() -> Iterator[Run]:
    r = Run()
    try:
        yield r
    finally:
        r.close()


def read_all(conn: socket.socket) -> bytes:
    data = b""
    while more := conn.recv(65536):
        data += more
    return data


def test_each_connection_gets_what_its_state_allows(keeper_run: Run) -> None:
    fresh, workers_ai, openai = answers()
    expected = {
        State.IDLE: b"",
        State.FRESH: fresh,
        State.EVENTS_WORKERS_AI: chunk(workers_ai) + END_OF_CHUNKS,
        State.EVENTS_OPENAI: chunk(openai) + END_OF_CHUNKS,
        State.BUSY: b"",
    }
    clients = {state: keeper_run.connection(int(state), state) for state in expected}
    # Between requests, with a request the dead server never read: it gets the 502.
    asked = keeper_run.connection(7, State.IDLE)
    asked.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    clients[State.BUSY].sendall(b"GET / HTTP/1.1\r\n")  # pipelined behind a write: closed
    keeper_run.parent.kill()
    assert keeper_run.finish().endswith("answered 4 of its 6 open connections")
    for state, client in clients.items():
        assert read_all(client) == expected[state], state
    assert read_all(asked) == fresh
    assert fresh.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b'"code":3008' in fresh and b"Retry-After: 1\r\n" in fresh
    assert b'"errors":[{"code":3008' in workers_ai and workers_ai.endswith(b"data: [DONE]\n\n")
    assert b'{"error":{' in openai and openai.endswith(b"data: [DONE]\n\n")


def test_it_answers_once_the_parents_threads_are_doomed_not_when_the_process_ends(
    keeper_run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A killed replica's process ends (pidfd, files closed) only after its last thread
    freed its memory: seconds on a busy machine. The keeper answers once `dying` says no
    thread will run the program again, the process still there."""
    looked_at: list[int] = []
    doomed = threading.Event()

    def dying(parent: int, proc: str = "/proc") -> bool:
        looked_at.append(parent)
        return doomed.is_set()

    monkeypatch.setattr(last_words_keeper, "dying", dying)
    client = keeper_run.connection(1, State.FRESH)
    time.sleep(3 * last_words_keeper.WATCH_S)
    assert looked_at and set(looked_at) == {keeper_run.parent.pid}
    assert keeper_run.thread.is_alive()  # alive and well: nothing written
    doomed.set()
    assert keeper_run.finish().endswith("answered 1 of its 1 open connections")
    assert keeper_run.parent.poll() is None  # answered before the process ended
    assert read_all(client).startswith(b"HTTP/1.1 502")


def _proc(root: Path, pid: int, tasks: dict[int, tuple[str, int, int]]) -> str:
    """A /proc of one process: its tasks' state letter, flags and pending signals (the
    leader is the task whose id is `pid`)."""
    for tid, (state, flags, pending) in tasks.items():
        stat = f"{tid} (ray::Serve Replica) {state} 1 1 1 0 -1 {flags} 0 0 0 0 1 2 3 4\n"
        for at in ([root / str(pid)] if tid == pid else []) + [root / str(pid) / "task" / str(tid)]:
            at.mkdir(parents=True, exist_ok=True)
            (at / "stat").write_text(stat)
            (at / "status").write_text(
                f"Name:\tx\nState:\t{state}\nSigPnd:\t{pending:016x}\nShdPnd:\t{0:016x}\n"
            )
    return str(root)


KILL = 1 << (signal.SIGKILL - 1)
EXITING = last_words_keeper.PF_EXITING


@pytest.mark.parametrize(
    ("tasks", "doomed"),
    [
        ({7: ("S", 0x400040, 0), 8: ("R", 0x40, 0)}, False),  # alive
        ({7: ("Z", EXITING, 0), 8: ("R", 0x40, KILL), 9: ("D", EXITING, 0)}, True),  # killed
        ({7: ("Z", EXITING, 0), 8: ("S", 0x40, 0)}, False),  # main thread left, others run
        ({7: ("R", EXITING, 0)}, True),  # the last thread frees the memory
        ({7: ("S", 0x40, KILL), 8: ("R", 0x40, KILL)}, False),  # main thread not out yet
    ],
)
def test_dying_reads_every_thread(
    tmp_path: Path, tasks: dict[int, tuple[str, int, int]], doomed: bool
) -> None:
    assert last_words_keeper.dying(7, _proc(tmp_path, 7, tasks)) is doomed


def test_dying_on_real_processes() -> None:
    assert not last_words_keeper.dying(os.getpid())  # this one, with threads
    child = subprocess.Popen(["sleep", "60"])
    assert not last_words_keeper.dying(child.pid)
    child.kill()
    child.wait()
    assert not last_words_keeper.dying(child.pid)  # gone from /proc: the pidfd tells


_REPLICA = """
import subprocess, time
from serve.gateway.last_words import LastWords
engine = subprocess.Popen(["sleep", "60"])  # the engine's processes, in the replica's group
keeper = LastWords(slots=4)
assert keeper.start()
print(engine.pid, keeper.pid, flush=True)
time.sleep(60)
"""


def _ended(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("own_group", [True, False])
def test_the_dead_replicas_own_process_group_is_ended_after_its_last_words(
    own_group: bool,
) -> None:
    """vLLM's EngineCore does not watch its parent: the keeper ends the dead replica's
    process group, where the replica leads one of its own (Ray's per-worker groups), having
    left it first (Ray's own end of the group must not cut its answers short). A replica
    in someone else's group (here: pytest's) has its group left alone."""
    replica = subprocess.Popen(
        [sys.executable, "-c", _REPLICA], stdout=subprocess.PIPE, text=True,
        start_new_session=own_group,
    )  # fmt: skip
    assert replica.stdout is not None
    engine, keeper = (int(pid) for pid in replica.stdout.readline().split())
    try:
        deadline = time.monotonic() + 10
        while os.getpgid(keeper) != keeper:  # it left the replica's group
            assert time.monotonic() < deadline, "the keeper stayed in the replica's group"
            time.sleep(0.02)
        replica.kill()
        replica.wait()
        deadline = time.monotonic() + 10
        while not _ended(keeper):
            assert time.monotonic() < deadline, "the keeper did not leave"
            time.sleep(0.05)
        assert _ended(engine) is own_group
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(engine, signal.SIGKILL)
        replica.stdout.close()


def test_a_released_slot_is_not_answered(keeper_run: Run) -> None:
    kept = keeper_run.connection(1, State.FRESH)
    released = keeper_run.connection(2, State.FRESH)
    keeper_run.control.send(b"U" + (2).to_bytes(4, "big"))
    assert released.recv(1) == b""  # the keeper let go of it at once
    keeper_run.parent.kill()
    assert keeper_run.finish().endswith("answered 1 of its 1 open connections")
    assert read_all(kept).startswith(b"HTTP/1.1 502")


def test_a_normal_stop_writes_nothing(keeper_run: Run) -> None:
    client = keeper_run.connection(1, State.EVENTS_OPENAI)
    keeper_run.control.close()  # the parent lives on and closes its end
    assert keeper_run.finish() == "stopped"
    assert read_all(client) == b""


def test_a_client_that_stopped_reading_is_closed_without_waiting(keeper_run: Run) -> None:
    server, client = socket.socketpair()
    server.setblocking(False)
    filler = 0
    with contextlib.suppress(BlockingIOError):
        while True:  # the client reads nothing: fill everything between them
            filler += server.send(b"x" * 65536)
    socket.send_fds(keeper_run.control, [b"R" + (1).to_bytes(4, "big")], [server.fileno()])
    server.close()
    keeper_run.states[1] = State.FRESH
    keeper_run.peers[1] = client
    started = time.monotonic()
    keeper_run.parent.kill()
    assert keeper_run.finish().endswith("answered 0 of its 1 open connections")
    assert time.monotonic() - started < DEADLINE_S + 1
    client.settimeout(5)
    assert read_all(client) == b"x" * filler  # then the end: no answer squeezed in


def test_without_pidfds_the_control_sockets_end_and_a_new_parent_tell(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(last_words_keeper, "_pidfd", lambda parent: None)
    # The watched parent is not this process's parent: once the control socket ends, the
    # keeper finds itself handed to another process, so the parent died.
    died = Run()
    try:
        client = died.connection(1, State.FRESH)
        died.control.close()
        assert died.finish().endswith("answered 1 of its 1 open connections")
        assert read_all(client).startswith(b"HTTP/1.1 502")
    finally:
        died.close()
    # The watched parent is this process's parent, alive: a normal stop, nothing written.
    stopped = Run(watched=os.getppid())
    try:
        client = stopped.connection(1, State.FRESH)
        stopped.control.close()
        assert stopped.finish() == "stopped"
        assert read_all(client) == b""
    finally:
        stopped.close()


class _Transport:
    """What `LastWords.register` reads of a transport."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def get_extra_info(self, name: str) -> object:
        return self.sock if name == "socket" else None

    def get_write_buffer_size(self) -> int:
        return 0


def test_a_keeper_not_started_or_full_takes_no_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, client = socket.socketpair()
    transport = cast(asyncio.Transport, _Transport(server))
    try:
        assert LastWords().register(transport) is None  # replica_last_words: false
        keeper = LastWords(slots=1)
        reasons: list[str] = []
        keeper.on_unprotected = reasons.append
        keeper.start()
        try:
            taken = keeper.register(transport)
            assert taken is not None and keeper.register(transport) is None
            assert "all 1 slots taken" in caplog.text
            assert reasons == ["slots_full"]
            keeper.release(taken)
            assert client.recv(1) == b""  # released: the connection's end reached the peer
            assert keeper.register(transport) is not None  # the slot is free again
        finally:
            keeper.close()
    finally:
        server.close()
        client.close()


@dataclass
class LiveKeeper:
    """A started keeper, a connection to hand it, and the reasons it counted."""

    keeper: LastWords
    transport: asyncio.Transport
    reasons: list[str]


@pytest.fixture
def live_keeper() -> Iterator[LiveKeeper]:
    server, client = socket.socketpair()
    keeper = LastWords()
    reasons: list[str] = []
    keeper.on_unprotected = reasons.append
    keeper.start()
    try:
        yield LiveKeeper(keeper, cast(asyncio.Transport, _Transport(server)), reasons)
    finally:
        keeper.close()
        server.close()
        client.close()


def test_a_keeper_that_died_is_noticed_once(
    live_keeper: LiveKeeper, caplog: pytest.LogCaptureFixture
) -> None:
    keeper, transport = live_keeper.keeper, live_keeper.transport
    assert keeper.pid is not None
    os.kill(keeper.pid, signal.SIGKILL)
    psutil.Process(keeper.pid).wait(5)  # its end of the control socket is closed
    assert keeper.register(transport) is None
    assert keeper.register(transport) is None
    gone = [r for r in caplog.records if "the keeper is gone" in r.getMessage()]
    assert len(gone) == 1 and gone[0].levelname == "ERROR"
    assert live_keeper.reasons == ["keeper_gone", "keeper_gone"]  # every connection since


def test_the_replicas_metrics_count_connections_that_go_without() -> None:
    keeper = LastWords()
    app = build_gateway(gateway_settings(), FakeEngine(), last_words=keeper)
    keeper.on_unprotected("keeper_busy")
    with TestClient(app) as client:
        text = client.get("/metrics").text
    name = "batchserve_last_words_unprotected_connections_total"
    assert f'{name}{{reason="keeper_busy"}} 1.0' in text.replace(',replica="local"', "")
    assert f'{name}{{reason="keeper_gone"}} 0.0' in text.replace(',replica="local"', "")


def test_where_no_keeper_can_run_the_replica_serves_without(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No memfd (macOS, say): a warning, and connections simply go without."""

    def no_memfd(name: str) -> int:
        raise AttributeError("module 'os' has no attribute 'memfd_create'")

    monkeypatch.setattr(os, "memfd_create", no_memfd)
    keeper = LastWords()
    assert keeper.start() is False
    assert "no keeper on this system" in caplog.text
    server, client = socket.socketpair()
    try:
        assert keeper.register(cast(asyncio.Transport, _Transport(server))) is None
    finally:
        server.close()
        client.close()


class _Flushed:
    def get_write_buffer_size(self) -> int:
        return 0


def _slot(states: mmap.mmap) -> Slot:
    server, client = socket.socketpair()
    try:
        return Slot(1, cast(asyncio.Transport, _Flushed()), server.fileno(), states)
    finally:
        server.close()
        client.close()


def _scope(method: str = "POST") -> dict[str, object]:
    return {"type": "http", "method": method, "path": "/v1/completions",
            "extensions": {SLOT_EXTENSION: {"slot": None}}}  # fmt: skip


async def _nothing(message: object) -> None:
    return None


async def _disconnect() -> dict[str, str]:
    return {"type": "http.disconnect"}


def _request(slot: Slot, app: object, method: str = "POST") -> object:
    scope = _scope(method)
    scope["extensions"] = {SLOT_EXTENSION: {"slot": slot}}
    return LastWordsMarks(cast(Any, app))(cast(Any, scope), cast(Any, _disconnect), _nothing)


def test_an_earlier_requests_app_cannot_overwrite_the_next_requests_state() -> None:
    """uvicorn starts a kept-alive connection's next request once the previous response is
    complete, while that request's app may still run (background work, Serve's hop back
    from the user-code thread): its end must not mark the new request's byte IDLE, which
    left the new request without an answer (found by review; reproduced with uvicorn)."""
    states = mmap.mmap(-1, 16)
    slot = _slot(states)

    async def scenario() -> None:
        finish = asyncio.Event()

        async def answered_then_busy(scope: object, receive: object, send: Any) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            await finish.wait()  # the response is complete; the app is not

        async def waits(scope: object, receive: object, send: Any) -> None:
            await asyncio.sleep(10)

        first = asyncio.ensure_future(cast(Any, _request(slot, answered_then_busy)))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(cast(Any, _request(slot, waits)))
        await asyncio.sleep(0)
        assert states[1] == State.FRESH
        finish.set()
        await first
        assert states[1] == State.FRESH  # still the second request's
        second.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await second

    asyncio.run(scenario())


def test_a_released_connections_requests_no_longer_write_its_byte() -> None:
    """After the connection ended its index belongs to the next connection: a request of
    the old one still winding up (shielded cleanup) must leave it alone."""
    states = mmap.mmap(-1, 16)
    slot = _slot(states)

    async def scenario() -> None:
        go_on = asyncio.Event()

        async def stream_after_the_end(scope: object, receive: object, send: Any) -> None:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
            await go_on.wait()
            await send({"type": "http.response.body", "body": b"data: x\n\n", "more_body": True})

        old = asyncio.ensure_future(cast(Any, _request(slot, stream_after_the_end)))
        await asyncio.sleep(0)
        slot.release()  # the connection ended
        states[1] = State.FRESH  # the next connection's request, in the same index
        go_on.set()
        await old
        assert states[1] == State.FRESH

    asyncio.run(scenario())


def test_a_request_that_ended_unanswered_leaves_the_connection_to_the_server() -> None:
    """An app that failed after a partial body: the server closes the connection (or
    writes its 500 if nothing was sent); the keeper must add nothing, even with a
    pipelined request unread behind it."""
    states = mmap.mmap(-1, 16)
    slot = _slot(states)

    async def scenario() -> None:
        async def fails_midway(scope: object, receive: object, send: Any) -> None:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
            await send({"type": "http.response.body", "body": b"data: x\n\n", "more_body": True})
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            await cast(Any, _request(slot, fails_midway))
        assert states[1] == State.BUSY

        async def answers(scope: object, receive: object, send: Any) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        await cast(Any, _request(slot, answers))
        assert states[1] == State.IDLE

    asyncio.run(scenario())


def test_a_head_request_is_never_answered_with_a_body() -> None:
    states = mmap.mmap(-1, 16)
    slot = _slot(states)

    async def scenario() -> None:
        async def waits(scope: object, receive: object, send: Any) -> None:
            assert states[1] == State.BUSY  # closed, not answered, should the replica die

        await cast(Any, _request(slot, waits, method="HEAD"))

    asyncio.run(scenario())


def test_a_transient_send_error_is_not_taken_for_a_dead_keeper(
    live_keeper: LiveKeeper, monkeypatch: pytest.MonkeyPatch
) -> None:
    keeper, transport = live_keeper.keeper, live_keeper.transport

    def short_of_buffers(*args: object) -> int:
        raise OSError(errno.ENOBUFS, "No buffer space available")

    with monkeypatch.context() as m:
        m.setattr(socket, "send_fds", short_of_buffers)
        assert keeper.register(transport) is None
    assert live_keeper.reasons == ["keeper_busy"]
    assert keeper.register(transport) is not None  # the keeper still takes the next
