"""A gateway on the fake engine for tests that need a real server process
(`uvicorn tests.tenancy_app:create_app --factory`), configured by environment:
TENANCY_APP_DIR (cache dir: the usage ledger lives there), TENANCY_APP_TENANTS
(tenants file), TENANCY_APP_DELAY_S (per-word delay of the fake engine),
TENANCY_APP_MAX_INFLIGHT, TENANCY_APP_RESERVED; with TENANCY_APP_MODEL (a checkpoint
dir) the real vLLM engine serves instead (the fairness benchmark, tests/bench/fairness.py);
TENANCY_APP_SETTINGS (a JSON object of Settings fields) overrides the rest."""

from __future__ import annotations

import json
import os

from fastapi import FastAPI

from serve.cluster import build_gateway
from serve.replica.engine import Engine
from serve.settings import Settings, cpu_catalog
from tests.fakes import FakeEngine


def create_app() -> FastAPI:
    model = os.environ.get("TENANCY_APP_MODEL")
    settings = Settings.model_validate(
        {
            "models": [
                m.model_dump() for m in cpu_catalog(model or "/nonexistent", embedded=False)
            ],
            "cache_dir": os.environ["TENANCY_APP_DIR"],
            "tenants_file": os.environ["TENANCY_APP_TENANTS"],
            "max_inflight_per_replica": int(os.environ.get("TENANCY_APP_MAX_INFLIGHT", "8")),
            "queue_max_per_tenant": 256,
            "queue_reserved_slots": int(os.environ.get("TENANCY_APP_RESERVED", "0")),
            "queue_max_wait_s": 600,
            **json.loads(os.environ.get("TENANCY_APP_SETTINGS", "{}")),
        }
    )
    engine: Engine
    if model:
        from serve.replica.vllm_engine import VllmEngine, export_vllm_environment

        export_vllm_environment(cpu_kv_cache_gib=1)
        engine = VllmEngine(settings.served_model)
    else:
        engine = FakeEngine(
            reply="one two three four five six seven eight",
            delay_s=float(os.environ.get("TENANCY_APP_DELAY_S", "0.02")),
        )
    return build_gateway(settings, engine)
