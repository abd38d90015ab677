"""vLLM's variables are set in the replica's process by the composition root, before the
engine starts (`batchserve up`, the chart and `serve run` all build replicas there), and
a value the environment already names wins (the chart's pods, the CPU image)."""

from __future__ import annotations

import os
from typing import Any

import pytest

from serve.cluster import compose_replica
from serve.replica import vllm_engine
from serve.settings import Settings

NAMES = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CONFIGURE_LOGGING", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")


class EngineStarted(Exception):
    """Raised by the stand-in engine: the replica is not built further."""


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process's environment, without vLLM's variables, for this test only."""
    env = {k: v for k, v in os.environ.items() if k not in NAMES}
    monkeypatch.setattr(os, "environ", env)
    return env


def test_compose_replica_sets_them_before_the_engine(
    environ: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, str] = {}

    def engine(*_args: Any, **_kwargs: Any) -> None:
        seen.update(os.environ)
        raise EngineStarted

    monkeypatch.setattr(vllm_engine, "VllmEngine", engine)
    with pytest.raises(EngineStarted):
        compose_replica(Settings(cpu_kv_cache_gib=3), "replica-1")
    assert {name: seen.get(name) for name in NAMES} == {
        "VLLM_CPU_KVCACHE_SPACE": "3",
        "VLLM_CONFIGURE_LOGGING": "0",
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0",
    }


def test_the_environment_wins(environ: dict[str, str]) -> None:
    environ.update(VLLM_CPU_KVCACHE_SPACE="5", VLLM_CONFIGURE_LOGGING="1")
    vllm_engine.export_vllm_environment(cpu_kv_cache_gib=2)
    assert (environ["VLLM_CPU_KVCACHE_SPACE"], environ["VLLM_CONFIGURE_LOGGING"]) == ("5", "1")
    assert environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "0"
