"""Peer stacks for `make bench`: Ray Serve LLM's `build_openai_app` on the same vLLM (CPU).

    python -m loadtest.peers ray-serve-llm --model DIR --port P

Runs its own Ray instance in this process (started here, stopped on SIGINT/SIGTERM) and serves
the OpenAI API on 127.0.0.1:P with one replica of the model. The mode is Ray's own: direct
streaming is switched on by `RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1`
in the environment, which must be set before Ray is imported (the bench sets it per process).

On a machine without a GPU, Ray Serve LLM needs an explicit CPU placement group (else it asks for
a GPU), and its ingress wants a CPU of its own, so Ray is told it has 8 CPUs.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

RAY_CPUS = 8
OBJECT_STORE_BYTES = 512 * 2**20


def llm_config(model: Path, served_name: str, max_model_len: int) -> Any:
    from ray.serve.llm import LLMConfig

    return LLMConfig(
        model_loading_config={"model_id": served_name, "model_source": str(model)},
        deployment_config={"num_replicas": 1},
        engine_kwargs={"dtype": "float32", "enforce_eager": True,
                       "max_model_len": max_model_len},
        placement_group_config={"bundles": [{"CPU": 1}]},
    )  # fmt: skip


def serve_ray_llm(model: Path, port: int, served_name: str, stop: threading.Event) -> None:
    import ray
    from ray import serve
    from ray.serve.llm import build_openai_app

    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, logging_level=logging.WARNING,
             object_store_memory=OBJECT_STORE_BYTES)  # fmt: skip
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_openai_app({"llm_configs": [llm_config(model, served_name, 1024)]})
        serve.run(app, name="ray-serve-llm", route_prefix="/", blocking=False)
        print(f"Ray Serve LLM deployed on port {port}", flush=True)
        stop.wait()
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()  # type: ignore[no-untyped-call]
        finally:
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.peers", description=__doc__)
    p.add_argument("stack", choices=["ray-serve-llm"])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--served-model-name", default="tiny")
    ns = p.parse_args(argv)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    serve_ray_llm(ns.model, ns.port, ns.served_model_name, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
