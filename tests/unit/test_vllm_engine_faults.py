"""How `VllmEngine` reports a dead EngineCore (stand-in AsyncLLM, real vLLM types).

On the real cluster (tests/cluster/test_faults.py) a SIGKILLed EngineCore makes vLLM
raise `EngineDeadError` in every running request and set its `errored` flag.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from serve.errors import EngineFailure, EngineUnavailable
from serve.replica.engine import GenerateRequest, SamplingOptions
from serve.replica.vllm_engine import VllmEngine
from serve.replica.watchdog import ProgressWatchdog


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class Output:
    outputs: list[Completion]
    finished: bool = False
    num_cached_tokens: int = 0


@dataclass
class DyingLLM:
    """AsyncLLM whose EngineCore dies after `outputs` outputs of the first request."""

    outputs: int
    errored: bool = False
    submitted: list[str] = field(default_factory=list)

    def generate(self, prompt: Any, params: Any, request_id: str, **_: Any) -> Any:
        from vllm.v1.engine.exceptions import EngineDeadError

        self.submitted.append(request_id)

        async def stream() -> AsyncIterator[Output]:
            for i in range(self.outputs):
                yield Output([Completion(f"t{i} ", [i])])
            self.errored = True  # what vLLM's engine-core monitor sets
            raise EngineDeadError()

        return stream()

    async def check_health(self) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError

        if self.errored:
            raise EngineDeadError()

    def get_num_unfinished_requests(self) -> int:
        return 0


def engine_over(llm: DyingLLM) -> VllmEngine:
    engine = VllmEngine.__new__(VllmEngine)  # no real engine: only generate and health
    engine._llm = cast(Any, llm)
    engine._outputs = 0
    engine._watchdog = ProgressWatchdog(60.0)
    engine._engine_processes = None
    return engine


def request(rid: str) -> GenerateRequest:
    return GenerateRequest(rid, [1, 2, 3], SamplingOptions(max_tokens=16, temperature=0.0))


async def test_engine_death_mid_request_is_an_engine_failure() -> None:
    llm = DyingLLM(outputs=2)
    engine = engine_over(llm)
    got: list[str] = []
    with pytest.raises(EngineFailure, match="engine died") as info:
        async for delta in engine.generate(request("r1")):
            got.append(delta.text)
    assert got == ["t0 ", "t1 "]  # what was generated reached the caller first
    assert (info.value.status, info.value.code) == (500, 3008)
    # The replica's health check now fails, so Serve replaces it.
    with pytest.raises(Exception, match="EngineCore"):
        await engine.check_health()


async def test_request_after_engine_death_is_refused_before_submission() -> None:
    llm = DyingLLM(outputs=0)
    engine = engine_over(llm)
    with pytest.raises(EngineFailure):
        async for _ in engine.generate(request("r1")):
            pass
    with pytest.raises(EngineUnavailable) as info:
        async for _ in engine.generate(request("r2")):
            pass
    assert (info.value.status, info.value.code) == (503, 3040)
    assert info.value.retry_after_s is not None
    assert llm.submitted == ["r1"]  # a dead engine is not handed new work
