"""`batchserve-loadtest` / `python -m loadtest`: run, sweep, slo-search, compare, report, mock.

Exit codes: 0 fine; 1 a `compare` regression; 2 the client under-delivered the asked rate;
3 bad arguments or data; 4 no request succeeded (server down, bad token...: see the errors
breakdown by cause, e.g. `401: 4` or `connect: 4`).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtest import client, report
from loadtest.calibrate import calibrate, mock_process
from loadtest.metrics import Slo, errors_by_cause, summarize, throughput_series
from loadtest.mock import MockConfig, serve_forever
from loadtest.records import RequestResult
from loadtest.schedule import (
    Arrival,
    ClosedLoop,
    LoadModel,
    OpenLoop,
    linear_ramp,
    open_loop,
)
from loadtest.sweep import slo_search, sweep
from loadtest.targets import Dialect, Target
from loadtest.workloads import (
    HFTokenizer,
    LengthDist,
    Session,
    Tokenizer,
    WordTokenizer,
    multi_turn,
    shared_prefix,
    sharegpt,
    synthetic,
)

EXIT_REGRESSION, EXIT_UNDER_DELIVERY, EXIT_USAGE, EXIT_NO_SUCCESS = 1, 2, 3, 4
DEFAULT_REQUESTS = 64
TOKEN_ENVS = ("BATCHSERVE_LOADTEST_TOKEN", "BATCHSERVE_DEV_TOKEN")


def _common(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("target")
    t.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    t.add_argument("--dialect", choices=[d.value for d in Dialect], default="workers-ai")
    t.add_argument("--model", default="@cf/qwen/qwen1.5-1.8b-chat")
    t.add_argument("--token", default=None, help=f"bearer token (default: ${TOKEN_ENVS[0]})")
    t.add_argument("--account", default="dev-account")
    t.add_argument("--no-stream", action="store_true")
    t.add_argument("--force-output", action="store_true", help="send ignore_eos + min_tokens")
    t.add_argument("--timeout", type=float, default=600.0)
    w = p.add_argument_group("workload")
    w.add_argument("--tokenizer", type=Path, help="the served model's checkpoint dir")
    w.add_argument(
        "--workload",
        choices=["synthetic", "sharegpt", "shared-prefix", "multi-turn"],
        default="synthetic",
    )
    w.add_argument("--dataset", type=Path, help="ShareGPT JSON file")
    w.add_argument(
        "-n",
        "--num-requests",
        type=int,
        help=f"requests (default {DEFAULT_REQUESTS}); not with --ramp, which sets the count",
    )
    w.add_argument("--input-len", default="64", help="N, A-B or MEAN,STD tokens")
    w.add_argument("--output-len", default="64", help="N, A-B or MEAN,STD tokens")
    w.add_argument("--prefix-len", type=int, default=256)
    w.add_argument("--groups", type=int, default=4)
    w.add_argument("--turns", type=int, default=3)
    w.add_argument("--think-time", type=float, default=0.0)
    w.add_argument("--chat", action="store_true", help="synthetic prompts as chat messages")
    w.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("client and output")
    r.add_argument("--workers", type=int, default=1, help="client processes")
    r.add_argument(
        "--slo",
        action="append",
        default=[],
        help="e.g. 'ttft:p99<=500' (ms; quote it: < is a shell redirection)",
    )
    r.add_argument("--token-source", choices=["server", "client"], default="server")
    r.add_argument("--delivery-tolerance", type=float, default=0.05)
    r.add_argument("--out", type=Path, help="result JSON (+ .requests.jsonl, .csv, .html)")
    r.add_argument("--no-progress", action="store_true")


def _load_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("load").add_mutually_exclusive_group()
    g.add_argument("--concurrency", type=int, help="closed loop (default 8)")
    g.add_argument("--rate", type=float, help="open loop, req/s")
    g.add_argument(
        "--ramp",
        nargs=3,
        type=float,
        metavar=("FROM", "TO", "SECONDS"),
        help="open loop, rate from FROM to TO req/s over SECONDS: sends (FROM+TO)/2*SECONDS "
        "requests (so not with -n)",
    )
    p.add_argument("--arrival", choices=[a.value for a in Arrival], default="poisson")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchserve-loadtest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="one load")
    _common(run_p)
    _load_args(run_p)
    sw = sub.add_parser("sweep", help="synchronous -> throughput -> interpolated rates")
    _common(sw)
    sw.add_argument("--steps", type=int, default=4)
    sw.add_argument("--max-concurrency", type=int, default=32)
    sw.add_argument("--arrival", choices=[a.value for a in Arrival], default="poisson")
    ss = sub.add_parser("slo-search", help="highest rate meeting every --slo")
    _common(ss)
    ss.add_argument("--low", type=float, required=True)
    ss.add_argument("--high", type=float, required=True)
    ss.add_argument("--iterations", type=int, default=5)
    ss.add_argument("--arrival", choices=[a.value for a in Arrival], default="poisson")
    cmp_p = sub.add_parser("compare", help="diff two result JSONs; non-zero on regression")
    cmp_p.add_argument("a", type=Path)
    cmp_p.add_argument("b", type=Path)
    cmp_p.add_argument("--max-regression", type=float, default=0.10, help="fraction, 0.1 = 10%%")
    rep = sub.add_parser("report", help="re-render the HTML report of a result JSON")
    rep.add_argument("result", type=Path)
    mock = sub.add_parser("mock", help="mock LLM server for both dialects (calibration)")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=8089)
    mock.add_argument("--ttft-ms", type=float, default=50.0)
    mock.add_argument("--itl-ms", type=float, default=10.0)
    mock.add_argument("--tokens-per-chunk", type=int, default=1)
    mock.add_argument("--rate-limit-every", type=int, default=0)
    cal = sub.add_parser("calibrate", help="measure the harness against its mock server")
    cal.add_argument("--streams", type=int, nargs="+", default=[1, 256])
    cal.add_argument("--ttft-ms", type=float, default=250.0)
    cal.add_argument("--itl-ms", type=float, default=50.0)
    cal.add_argument(
        "--dialect",
        nargs="+",
        choices=[d.value for d in Dialect],
        default=[Dialect.OPENAI_CHAT.value],
        help="one or more (default openai-chat)",
    )
    return parser


def resolve_num_requests(ns: argparse.Namespace) -> None:
    """-n defaults to DEFAULT_REQUESTS; a --ramp sets the count itself, so -n is refused."""
    if not hasattr(ns, "num_requests"):
        return
    if getattr(ns, "ramp", None) is not None:
        if ns.num_requests is not None:
            raise ValueError(
                "--ramp FROM TO SECONDS sends (FROM+TO)/2*SECONDS requests: drop -n, or use "
                "--rate with -n"
            )
    elif ns.num_requests is None:
        ns.num_requests = DEFAULT_REQUESTS


def target_of(ns: argparse.Namespace) -> Target:
    token = ns.token or next((os.environ[e] for e in TOKEN_ENVS if os.environ.get(e)), None)
    return Target(
        base_url=ns.url,
        dialect=Dialect(ns.dialect),
        model=ns.model,
        token=token,
        account=ns.account,
        stream=not ns.no_stream,
        force_output=ns.force_output,
    )


def tokenizer_of(ns: argparse.Namespace) -> Tokenizer:
    if not ns.tokenizer:
        return WordTokenizer()
    if not ns.tokenizer.is_dir():
        raise ValueError(f"--tokenizer {ns.tokenizer}: not a directory (a checkpoint dir)")
    try:
        return HFTokenizer(ns.tokenizer)
    except (OSError, ValueError) as exc:  # transformers: no usable tokenizer files there
        raise ValueError(f"--tokenizer {ns.tokenizer}: no usable tokenizer ({exc})") from exc


def sessions_of(ns: argparse.Namespace, tok: Tokenizer, n: int, seed: int) -> list[Session]:
    inp, out = LengthDist.parse(ns.input_len), LengthDist.parse(ns.output_len)
    if ns.workload == "sharegpt":
        if ns.dataset is None:
            raise ValueError("--workload sharegpt needs --dataset FILE")
        try:
            return sharegpt(ns.dataset, tok, n, seed)
        except OSError as exc:
            raise ValueError(f"--dataset {ns.dataset}: {exc.strerror or exc}") from exc
        except ValueError as exc:  # not JSON, or no conversations
            raise ValueError(f"--dataset {ns.dataset}: {exc}") from exc
    if ns.workload == "shared-prefix":
        return shared_prefix(tok, n, ns.groups, ns.prefix_len, inp, out, seed)
    if ns.workload == "multi-turn":
        return multi_turn(tok, n, ns.turns, inp, out, ns.think_time, seed)
    return synthetic(tok, n, inp, out, seed, raw=not ns.chat)


def load_of(ns: argparse.Namespace) -> LoadModel:
    if ns.rate is not None:
        return open_loop(ns.rate, ns.num_requests, Arrival(ns.arrival), ns.seed, ns.burstiness)
    if ns.ramp is not None:
        return linear_ramp(*ns.ramp)
    return ClosedLoop(ns.concurrency or 8)


def config_of(ns: argparse.Namespace, load: str) -> dict[str, Any]:
    skip = {"token", "func", "command"}
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(ns).items() if k not in skip}
    return {**cfg, "load": load, "command": ns.command}


class _Live:
    """A rich live line with running figures (off when not a terminal or --no-progress)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total, self.t0 = enabled, total, time.monotonic()
        self.live: Any = None
        if enabled:
            from rich.live import Live

            self.live = Live(refresh_per_second=4, transient=True)

    def __enter__(self) -> _Live:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def update(self, p: client.Progress) -> None:
        if self.live is None:
            return
        dt = max(time.monotonic() - self.t0, 1e-6)
        self.live.update(
            f"sent {p.sent}/{self.total}  done {p.done}  errors {p.errors}  "
            f"in flight {p.sent - p.done}  {p.done / dt:.2f} req/s  {p.reads / dt:.0f} reads/s"
        )


def execute(
    ns: argparse.Namespace, target: Target, tok: Tokenizer, load: LoadModel, label: str
) -> tuple[dict[str, Any], client.RunOutput]:
    n = len(load.deadlines) if not isinstance(load, ClosedLoop) else ns.num_requests
    sessions = sessions_of(ns, tok, n, ns.seed)
    slos = [Slo.parse(s) for s in ns.slo]
    with _Live(not ns.no_progress and sys.stderr.isatty(), n) as live:
        out = client.run(
            target,
            sessions,
            load,
            tokenizer=tok,
            workers=ns.workers,
            timeout_s=ns.timeout,
            delivery_tolerance=ns.delivery_tolerance,
            on_progress=live.update,
        )
    summary = summarize(out.results, slos, ns.token_source)
    summary["client"] = {**out.monitor, "loop": out.loop, "workers": out.workers}
    if out.delivery is not None:
        d = out.delivery
        summary["delivery"] = {
            "asked_rate": d.asked_rate,
            "achieved_rate": d.achieved_rate,
            "max_dispatch_lag_s": d.max_dispatch_lag_s,
            "ok": d.ok,
        }
    _print_summary(label, summary)
    return summary, out


def _causes(by_cause: dict[str, int]) -> str:
    return f" ({', '.join(f'{k}: {v}' for k, v in by_cause.items())})" if by_cause else ""


def _print_summary(label: str, s: dict[str, Any]) -> None:
    ms = s.get("ms", {})

    def q(metric: str, p: str) -> str:
        v = ms.get(metric, {}).get(p)
        return "-" if v is None else f"{v:.1f}"

    print(
        f"[{label}] {s.get('completed', 0)}/{s.get('requests', 0)} ok, "
        f"{s.get('output_token_throughput_tps', 0):.1f} out tok/s, "
        f"{s.get('request_throughput_rps', 0):.2f} req/s, "
        f"TTFT p50/p99 {q('ttft', 'p50')}/{q('ttft', 'p99')} ms, "
        f"ITL p50 {q('itl', 'p50')} ms, E2E p99 {q('e2e', 'p99')} ms, "
        f"errors {s.get('errors', 0)}"
        + _causes(s.get("errors_by_cause", {}))
        + (f", 429 refused in p99 {q('refusal', 'p99')} ms" if s.get("rate_limited") else "")
        + (" CLIENT-BOUND" if s.get("client", {}).get("client_bound") else "")
        + ("" if s.get("delivery", {}).get("ok", True) else " UNDER-DELIVERED"),
        flush=True,
    )
    gp = s.get("goodput")
    if gp:
        values = ", ".join(f"{k} -> {_ms_text(v)}" for k, v in gp["run_values_ms"].items())
        print(f"  goodput {gp['goodput_rps']:.2f} req/s, attainment {gp['attainment']:.1%}, "
              f"SLOs {'met' if gp['met'] else 'MISSED'}: {values}")  # fmt: skip


def _ms_text(v: float) -> str:
    return f"{v:.1f} ms" if math.isfinite(v) else "inf (errors count as infinite)"


def cmd_run(ns: argparse.Namespace) -> int:
    target, tok, load = target_of(ns), tokenizer_of(ns), load_of(ns)
    if isinstance(load, OpenLoop):  # a ramp's count, in the result's config
        ns.num_requests = len(load.deadlines)
    summary, out = execute(ns, target, tok, load, load.describe())
    if ns.out:
        doc = report.result_document(
            config_of(ns, load.describe()),
            summary,
            summary["client"],
            throughput_series(out.results),
        )
        paths = report.write_results(ns.out, doc, out.results)
        print(f"wrote {ns.out} and {', '.join(str(p) for p in paths)}")
    if _none_ok(out.results):
        return EXIT_NO_SUCCESS
    return EXIT_UNDER_DELIVERY if out.failed_delivery else 0


def _none_ok(results: list[RequestResult]) -> bool:
    """Every request failed: say so on stderr (the exit code is EXIT_NO_SUCCESS)."""
    if not results or any(r.ok for r in results):
        return False
    causes = _causes(errors_by_cause(results))
    print(f"batchserve-loadtest: no request succeeded{causes}", file=sys.stderr)
    return True


def _stepper(
    ns: argparse.Namespace,
) -> tuple[Callable[[LoadModel, str], dict[str, Any]], list[RequestResult]]:
    target, tok = target_of(ns), tokenizer_of(ns)
    every: list[RequestResult] = []

    def step(load: LoadModel, label: str) -> dict[str, Any]:
        summary, out = execute(ns, target, tok, load, label)
        every.extend(out.results)
        return summary

    return step, every


def _write_steps(ns: argparse.Namespace, steps: list[Any], results: list[RequestResult]) -> None:
    if not ns.out:
        return
    rows = [{"label": s.label, "load": s.load, "rate": s.rate, "summary": s.summary} for s in steps]
    last = rows[-1]["summary"] if rows else {}
    doc = report.result_document(
        config_of(ns, ns.command), last, last.get("client", {}), [], sweep=rows
    )
    report.write_results(ns.out, doc, results)
    print(f"wrote {ns.out}")


def cmd_sweep(ns: argparse.Namespace) -> int:
    step, every = _stepper(ns)
    steps = sweep(step, ns.num_requests, ns.max_concurrency, ns.steps, Arrival(ns.arrival), ns.seed)
    _write_steps(ns, steps, every)
    return EXIT_NO_SUCCESS if _none_ok(every) else 0


def cmd_slo_search(ns: argparse.Namespace) -> int:
    if not ns.slo:
        print("slo-search needs at least one --slo", file=sys.stderr)
        return EXIT_USAGE
    step, every = _stepper(ns)
    slos = [Slo.parse(s) for s in ns.slo]
    best, steps = slo_search(
        step, slos, ns.low, ns.high, ns.num_requests, ns.iterations, Arrival(ns.arrival), ns.seed
    )
    print("highest rate meeting the SLOs:", "none" if best is None else f"{best:.3g} req/s")
    _write_steps(ns, steps, every)
    return EXIT_NO_SUCCESS if _none_ok(every) else 0


def cmd_compare(ns: argparse.Namespace) -> int:
    a, b = report.load(ns.a), report.load(ns.b)
    differences = report.workload_differences(a, b)
    if differences:
        print(
            "warning: the two runs had different workloads, so a change below may not be the "
            "server's:\n  " + "\n  ".join(differences),
            file=sys.stderr,
        )
    rows, bad = report.compare(a, b, ns.max_regression)
    print(report.compare_table(rows))
    return EXIT_REGRESSION if bad else 0


def cmd_report(ns: argparse.Namespace) -> int:
    doc = report.load(ns.result)
    html_path = ns.result.with_suffix(".html")
    html_path.write_text(report.render_html(doc, report.load_requests(ns.result, doc)))
    print(f"wrote {html_path}")
    return 0


def cmd_mock(ns: argparse.Namespace) -> int:
    cfg = MockConfig(
        ttft_s=ns.ttft_ms / 1e3,
        itl_s=ns.itl_ms / 1e3,
        tokens_per_chunk=ns.tokens_per_chunk,
        rate_limit_every=ns.rate_limit_every,
    )
    with contextlib.suppress(KeyboardInterrupt):
        client.run_on_fast_loop(serve_forever(cfg, ns.host, ns.port))
    return 0


def cmd_calibrate(ns: argparse.Namespace) -> int:
    with mock_process(ns.ttft_ms, ns.itl_ms) as url:
        for dialect, streams in itertools.product(map(Dialect, ns.dialect), ns.streams):
            c = calibrate(url, streams, max(3 * streams, 6), ns.ttft_ms, ns.itl_ms, dialect=dialect)
            print(
                f"{dialect.value} {streams:>4} streams: errors {c['errors']}, "
                f"TTFT-TTFB p50 {c['ttft_minus_ttfb_p50_ms']:.2f} ms "
                f"({c['ttft_error']:+.2%}), ITL p50 {c['itl_p50_ms']:.2f} ms "
                f"({c['itl_error']:+.2%}), client+mock overhead (TTFB p50) "
                f"{c['client_overhead_ttfb_p50_ms']:.2f} ms, loop lag p99 "
                f"{c['client']['loop_lag_p99_ms']:.1f} ms"
                + (" CLIENT-BOUND" if c["client"]["client_bound"] else "")
            )
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "sweep": cmd_sweep,
    "slo-search": cmd_slo_search,
    "compare": cmd_compare,
    "report": cmd_report,
    "mock": cmd_mock,
    "calibrate": cmd_calibrate,
}


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        resolve_num_requests(ns)
        if getattr(ns, "out", None) is not None:
            report.check_writable(ns.out)  # before the run, not after it
        return COMMANDS[ns.command](ns)
    except (ValueError, OSError) as exc:  # bad arguments, missing or unreadable files
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"batchserve-loadtest: {message}", file=sys.stderr)
        return EXIT_USAGE
