"""How `batchserve up` answers signals once it serves (serve/cli.py `cmd_up`), with a fake
cluster in place of Ray: the first SIGTERM or SIGINT drains, then stops; a second one during
the drain stops at once; a drain that runs out of time still ends in a stop; nothing
interrupts the stop itself. The real drain runs in tests/cluster/test_shutdown.py."""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from serve import cli
from serve import cluster as cluster_module
from serve.settings import Settings
from tests.gateway.conftest import gateway_settings

# What `cmd_up` asks of its cluster when it drains before stopping.
DRAINED = ["start", "started", "drain", "drained", "stop", "stopped"]


def _signal_soon(signum: int, after_s: float = 0.2) -> None:
    threading.Timer(after_s, os.kill, (os.getpid(), signum)).start()


class FakeCluster:
    """Records what `cmd_up` asked of it; `on_drain` / `on_stop` run inside those calls."""

    instances: ClassVar[list[FakeCluster]] = []
    on_start: Callable[[], None] = staticmethod(lambda: _signal_soon(signal.SIGTERM))
    on_drain: Callable[[], bool] = staticmethod(lambda: True)
    on_stop: Callable[[], None] = staticmethod(lambda: None)

    def __init__(self, settings: Settings) -> None:
        self.calls: list[str] = []
        FakeCluster.instances.append(self)

    def start(self, after_ray_init: Callable[[], object] = lambda: None) -> None:
        self.calls.append("start")
        after_ray_init()
        type(self).on_start()
        self.calls.append("started")

    def drain(self) -> bool:
        self.calls.append("drain")
        drained = type(self).on_drain()
        self.calls.append("drained")
        return drained

    def stop(self) -> None:
        self.calls.append("stop")
        type(self).on_stop()
        self.calls.append("stopped")


@pytest.fixture
def up(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Callable[[], int]]:
    monkeypatch.setattr(os, "environ", dict(os.environ))  # cmd_up sets Ray's variables
    monkeypatch.setattr(cluster_module, "LocalCluster", FakeCluster)
    monkeypatch.setattr(cli, "_use_haproxy_wrapper", lambda settings: None)
    monkeypatch.setattr(cli, "_wait_ready", lambda url, timeout_s, stop: True)
    monkeypatch.setattr(cli, "_watch_serving", lambda url, serving, done: None)
    settings = gateway_settings(cache_dir=str(tmp_path), graceful_shutdown_timeout_s=5)
    monkeypatch.setattr(cli, "up_settings", lambda ns, base: (settings, "t0ken"))
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    FakeCluster.instances.clear()
    try:
        yield lambda: cli.cmd_up(argparse.Namespace())
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def test_the_first_signal_drains_then_stops(
    up: Callable[[], int], capsys: pytest.CaptureFixture[str]
) -> None:
    assert up() == 0
    assert FakeCluster.instances[0].calls == DRAINED
    out = capsys.readouterr().out
    assert "draining the replicas (up to 5 s" in out and "stopping batchserve ..." in out


def test_a_second_signal_during_the_drain_stops_at_once(
    up: Callable[[], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    def slow_drain() -> bool:
        _signal_soon(signal.SIGINT, 0.1)
        time.sleep(10)  # interrupted by the second signal
        return True

    monkeypatch.setattr(FakeCluster, "on_drain", staticmethod(slow_drain))
    started = time.monotonic()
    assert up() == 130
    assert time.monotonic() - started < 5
    assert FakeCluster.instances[0].calls == ["start", "started", "drain", "stop", "stopped"]


def test_a_drain_out_of_time_still_stops(
    up: Callable[[], int], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(FakeCluster, "on_drain", staticmethod(lambda: False))
    assert up() == 0
    assert FakeCluster.instances[0].calls[-2:] == ["stop", "stopped"]
    assert "did not stop in time" in capsys.readouterr().err


def test_nothing_interrupts_the_stop(
    up: Callable[[], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    def stop_under_signals() -> None:
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)

    monkeypatch.setattr(FakeCluster, "on_stop", staticmethod(stop_under_signals))
    assert up() == 0
    assert FakeCluster.instances[0].calls[-2:] == ["stop", "stopped"]


def test_a_signal_before_up_saw_the_stack_ready_still_drains(
    up: Callable[[], int], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """HAProxy serves as soon as a replica is up, up to a poll before `_wait_ready` sees it:
    a SIGTERM then must drain the streams already running, not stop and cut them (a
    clean-clone CI run of tests/cluster/test_shutdown.py: its long stream was cut 0.64 s
    after the signal, and `up` exited after 3 s without draining)."""

    def wait_ready(url: str, timeout_s: float, stop: threading.Event) -> bool:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(5)
        return False

    monkeypatch.setattr(FakeCluster, "on_start", staticmethod(lambda: None))
    monkeypatch.setattr(cli, "_wait_ready", wait_ready)
    assert up() == 0
    assert FakeCluster.instances[0].calls == DRAINED
    out = capsys.readouterr().out
    assert "batchserve is up" not in out and "draining the replicas" in out


def test_a_signal_during_the_start_up_once_serving_lets_it_return_then_drains(
    up: Callable[[], int], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """HAProxy serves before Serve reports the application running (`cluster.start`
    returns): a SIGTERM in between must not interrupt the start-up and stop, which cut
    every stream (a clean-clone CI run of tests/cluster/test_shutdown.py: the signal came
    after ray.init, whose own handler ended the process at once, 0.07 s)."""

    def serving_at_once(url: str, serving: threading.Event, done: threading.Event) -> None:
        serving.set()

    def start_under_a_signal() -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # our handler, reinstalled after ray.init
        time.sleep(0.3)  # not interrupted

    monkeypatch.setattr(cli, "_watch_serving", serving_at_once)
    monkeypatch.setattr(FakeCluster, "on_start", staticmethod(start_under_a_signal))
    assert up() == 0
    assert FakeCluster.instances[0].calls == DRAINED
    assert "once its start-up returns" in capsys.readouterr().out


def test_a_signal_during_the_start_up_before_anything_serves_interrupts_it(
    up: Callable[[], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    def start_under_a_signal() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(10)  # interrupted

    monkeypatch.setattr(FakeCluster, "on_start", staticmethod(start_under_a_signal))
    started = time.monotonic()
    assert up() == 130
    assert time.monotonic() - started < 5
    assert FakeCluster.instances[0].calls == ["start", "stop", "stopped"]


def test_ray_init_handing_sigterm_to_ray_is_undone_before_the_deploy(
    up: Callable[[], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[object] = []

    def ray_takes_sigterm() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # what ray.init does, in effect

    original = FakeCluster.start

    def start(self: FakeCluster, after_ray_init: Callable[[], object] = lambda: None) -> None:
        def after() -> object:
            ray_takes_sigterm()
            after_ray_init()
            seen.append(signal.getsignal(signal.SIGTERM))
            return None

        original(self, after)

    monkeypatch.setattr(FakeCluster, "start", start)
    assert up() == 0
    assert seen and seen[0] not in (signal.SIG_DFL, signal.SIG_IGN)


def test_a_deferred_stop_does_not_wait_for_a_start_up_that_never_ends(
    up: Callable[[], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Serving, then a signal: the stop waits for the start-up, but no longer than the
    drain budget (5 s here), after which the start-up is interrupted."""

    def serving_at_once(url: str, serving: threading.Event, done: threading.Event) -> None:
        serving.set()

    def start_that_hangs() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # a replica that never gets ready

    monkeypatch.setattr(cli, "_watch_serving", serving_at_once)
    monkeypatch.setattr(FakeCluster, "on_start", staticmethod(start_that_hangs))
    started = time.monotonic()
    assert up() == 130
    assert 4 < time.monotonic() - started < 15
    assert FakeCluster.instances[0].calls == ["start", "stop", "stopped"]
