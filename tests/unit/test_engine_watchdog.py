"""The engine progress watchdog behind the replica's health check (fake clock)."""

from __future__ import annotations

import pytest

from serve.replica.watchdog import EngineStalled, ProgressWatchdog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def dog(clock: Clock) -> ProgressWatchdog:
    return ProgressWatchdog(30.0, clock=clock)


def test_idle_engine_is_healthy_forever(dog: ProgressWatchdog, clock: Clock) -> None:
    for _ in range(10):
        dog.check(unfinished=0, outputs=7)
        clock.now += 100


def test_busy_engine_that_keeps_producing_is_healthy(dog: ProgressWatchdog, clock: Clock) -> None:
    for outputs in range(10):
        dog.check(unfinished=5, outputs=outputs)
        clock.now += 100  # far longer than stall_s between checks, but output moved


def test_work_without_output_for_stall_s_fails(dog: ProgressWatchdog, clock: Clock) -> None:
    dog.check(unfinished=3, outputs=42)  # last progress seen
    clock.now += 29.9
    dog.check(unfinished=3, outputs=42)
    clock.now += 0.1
    with pytest.raises(EngineStalled) as raised:
        dog.check(unfinished=3, outputs=42)
    assert raised.value.status == 503 and raised.value.unfinished == 3
    assert raised.value.stalled_s == pytest.approx(30.0)
    clock.now += 10
    with pytest.raises(EngineStalled):  # stays unhealthy while stalled
        dog.check(unfinished=3, outputs=42)


def test_stall_counts_from_when_work_appeared(dog: ProgressWatchdog, clock: Clock) -> None:
    """Idle for an hour, then a request arrives: a long prefill gets stall_s from its start."""
    dog.check(unfinished=0, outputs=1)
    clock.now += 3600
    dog.check(unfinished=1, outputs=1)
    clock.now += 29
    dog.check(unfinished=1, outputs=1)
    clock.now += 2
    with pytest.raises(EngineStalled):
        dog.check(unfinished=1, outputs=1)


def test_recovers_when_output_moves_again(dog: ProgressWatchdog, clock: Clock) -> None:
    dog.check(unfinished=2, outputs=5)
    clock.now += 31
    with pytest.raises(EngineStalled):
        dog.check(unfinished=2, outputs=5)
    dog.check(unfinished=2, outputs=6)
    clock.now += 29
    dog.check(unfinished=2, outputs=6)


def test_draining_to_idle_resets(dog: ProgressWatchdog, clock: Clock) -> None:
    dog.check(unfinished=2, outputs=5)
    clock.now += 20
    dog.check(unfinished=0, outputs=5)
    dog.check(unfinished=1, outputs=5)
    clock.now += 20
    dog.check(unfinished=1, outputs=5)  # only 20 s since the new work appeared


class StoppedLLM:
    """AsyncLLM's front end while its EngineCore is SIGSTOPped: alive flag, work queued."""

    errored = False

    def __init__(self, unfinished: int) -> None:
        self.unfinished = unfinished

    async def check_health(self) -> None:
        return None  # vLLM only checks its dead flag

    def get_num_unfinished_requests(self) -> int:
        return self.unfinished


async def test_vllm_engine_health_check_consults_the_watchdog(clock: Clock) -> None:
    from serve.replica.vllm_engine import VllmEngine

    engine = VllmEngine.__new__(VllmEngine)  # no real engine: only the health path
    engine._llm = StoppedLLM(unfinished=2)
    engine._outputs = 10
    engine._watchdog = ProgressWatchdog(30.0, clock=clock)
    engine._engine_processes = None  # not the CPU backend: outputs only
    await engine.check_health()
    clock.now += 31
    with pytest.raises(EngineStalled):
        await engine.check_health()
    engine._outputs += 1  # it produced something again
    await engine.check_health()


def test_settings_refuse_a_stall_limit_the_timeout_would_hide() -> None:
    from pydantic import ValidationError

    from serve.settings import Settings

    assert Settings().engine_stall_s + Settings().health_check_period_s < 300
    with pytest.raises(ValidationError, match="engine_stall_s"):
        Settings(request_timeout_s=60, engine_stall_s=60)


def test_a_declared_stall_outlives_the_timed_out_requests(
    dog: ProgressWatchdog, clock: Clock
) -> None:
    """The request timeout aborts the stalled requests; the engine is still stopped, so
    the health check must keep failing (Serve needs several failures in a row)."""
    dog.check(unfinished=2, outputs=5)
    clock.now += 31
    with pytest.raises(EngineStalled):
        dog.check(unfinished=2, outputs=5)
    for _ in range(3):
        clock.now += 10
        with pytest.raises(EngineStalled, match="with 2 unfinished"):
            dog.check(unfinished=0, outputs=5)
    dog.check(unfinished=0, outputs=6)  # it produced something: healthy again
    clock.now += 100
    dog.check(unfinished=0, outputs=6)


# -- a long engine step (the CPU backend): the engine's CPU time counts as progress -------


def test_a_step_longer_than_stall_s_is_not_a_stall_while_the_engine_computes(
    dog: ProgressWatchdog, clock: Clock
) -> None:
    """One prefill of 7,890 tokens took 43 s on 2 vCPUs: no output meanwhile, but the
    worker used a whole core."""
    busy = 50.0
    dog.check(unfinished=1, outputs=3, busy_s=busy)
    for _ in range(12):  # 120 s without an output
        clock.now += 10
        busy += 9.9
        dog.check(unfinished=1, outputs=3, busy_s=busy)


def test_an_engine_that_polls_but_does_not_compute_is_still_stalled(
    dog: ProgressWatchdog, clock: Clock
) -> None:
    """A SIGSTOPped EngineCore: its worker keeps polling for work at about a tenth of a
    core (1.1 s in 10 s, measured), below the half a core that counts as computing."""
    busy = 50.0
    dog.check(unfinished=1, outputs=3, busy_s=busy)
    for _ in range(2):
        clock.now += 10
        busy += 1.1
        dog.check(unfinished=1, outputs=3, busy_s=busy)
    clock.now += 10
    busy += 1.1
    with pytest.raises(EngineStalled):
        dog.check(unfinished=1, outputs=3, busy_s=busy)


def test_a_reading_across_changed_processes_is_not_progress(
    dog: ProgressWatchdog, clock: Clock
) -> None:
    """`busy_s` None (the engine's processes changed) drops the baseline: the next sum,
    of other processes, is not compared with the old one."""
    dog.check(unfinished=1, outputs=3, busy_s=10.0)
    clock.now += 15
    dog.check(unfinished=1, outputs=3, busy_s=None)
    clock.now += 10
    dog.check(unfinished=1, outputs=3, busy_s=500.0)  # a new baseline, not 490 s of work
    clock.now += 10
    with pytest.raises(EngineStalled):
        dog.check(unfinished=1, outputs=3, busy_s=500.5)


class Processes:
    def __init__(self) -> None:
        self.busy = 0.0

    def cpu_seconds(self) -> float | None:
        return self.busy


async def test_vllm_engine_health_check_reports_the_engines_cpu_time(clock: Clock) -> None:
    from serve.replica.vllm_engine import VllmEngine

    engine = VllmEngine.__new__(VllmEngine)
    engine._llm = StoppedLLM(unfinished=1)
    engine._outputs = 10
    engine._watchdog = ProgressWatchdog(30.0, clock=clock)
    processes = Processes()
    engine._engine_processes = processes  # type: ignore[assignment]
    for _ in range(6):  # a minute of one long step
        await engine.check_health()
        clock.now += 10
        processes.busy += 10
    await engine.check_health()  # the last reading with the engine computing
    for _ in range(2):  # then it stops: 10 and 20 s without progress
        clock.now += 10
        await engine.check_health()
    clock.now += 10
    with pytest.raises(EngineStalled):
        await engine.check_health()
