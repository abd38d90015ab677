"""Run-level figures from per-request results: exact percentiles, throughput, goodput, SLOs.

Names are unambiguous: `ttfb` (first body byte), `ttft` (first content-bearing event), `icl`
(inter-chunk latency), `itl` (per-token inter-token latency: chunk gaps split over the chunk's
tokens), `tpot` (per request: (last - first content) / (tokens - 1)), `e2e`. `*_sched` variants
are measured from the intended send time (coordinated omission), `dispatch_lag` is their
difference. Errors count as SLO misses.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from loadtest.records import RequestResult

PERCENTILES: tuple[float, ...] = (50, 90, 95, 99)
DISAGREEMENT_TOLERANCE = 0.02


def percentile(values: Sequence[float], p: float) -> float:
    """Exact percentile by linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    if not 0 <= p <= 100:
        raise ValueError("p must be within [0, 100]")
    v = sorted(values)
    k = (len(v) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(v) - 1)
    if k == lo or v[hi] == v[lo]:  # also inf and inf (errors), whose difference is NaN
        return v[lo]
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def distribution(values: Sequence[float], pcts: Iterable[float] = PERCENTILES) -> dict[str, float]:
    if not values:
        return {"count": 0}
    out: dict[str, float] = {
        "count": len(values),
        "mean": sum(values) / len(values),
        "min": min(values),
        "max": max(values),
    }
    for p in pcts:
        out[f"p{p:g}"] = percentile(values, p)
    return out


@dataclass(frozen=True)
class Slo:
    """`metric` (ttft, itl, tpot, e2e, or their `_sched` forms) at percentile `p` must be at most
    `threshold_ms`. Per request: ttft/tpot/e2e directly, itl at the request's own p-th
    percentile. Per run: the p-th percentile over all requests (errors as infinity)."""

    metric: str
    threshold_ms: float
    p: float = 99.0

    @classmethod
    def parse(cls, spec: str) -> Slo:
        m = re.fullmatch(r"(\w+?)(?::p(\d+(?:\.\d+)?))?<=?(\d+(?:\.\d+)?)(?:ms)?", spec.strip())
        if not m or m[1] not in _SLO_METRICS:
            raise ValueError(
                f"SLO {spec!r}: use e.g. 'ttft:p99<=500' (metrics {sorted(_SLO_METRICS)})"
            )
        return cls(m[1], float(m[3]), float(m[2]) if m[2] else 99.0)

    def value_s(self, r: RequestResult, token_source: str = "server") -> float:
        if not r.ok:
            return math.inf
        v: float | None
        if self.metric == "itl":
            itl = r.itl_s
            v = percentile(itl, self.p) if itl else 0.0
        elif self.metric == "tpot":
            v = r.tpot_s(token_source)
            v = 0.0 if v is None else v
        else:
            v = getattr(r, f"{self.metric}_s")
        return math.inf if v is None else float(v)

    def met_by(self, r: RequestResult, token_source: str = "server") -> bool:
        return self.value_s(r, token_source) * 1000 <= self.threshold_ms

    def run_value_ms(self, results: Sequence[RequestResult], token_source: str = "server") -> float:
        if self.metric == "itl":
            pooled = [x for r in results if r.ok for x in r.itl_s]
            errors = sum(not r.ok for r in results)
            values = pooled + [math.inf] * errors
        else:
            values = [self.value_s(r, token_source) for r in results]
        return percentile(values, self.p) * 1000 if values else math.inf

    def describe(self) -> str:
        return f"{self.metric}:p{self.p:g}<={self.threshold_ms:g}ms"


_SLO_METRICS = {"ttft", "itl", "tpot", "e2e", "ttft_sched", "e2e_sched"}


def goodput(
    results: Sequence[RequestResult], slos: Sequence[Slo], duration_s: float, source: str = "server"
) -> dict[str, float]:
    good = sum(1 for r in results if r.ok and all(s.met_by(r, source) for s in slos))
    return {
        "good_requests": good,
        "attainment": good / len(results) if results else math.nan,
        "goodput_rps": good / duration_s if duration_s > 0 else math.nan,
    }


def _ms(values: Iterable[float | None]) -> list[float]:
    return [v * 1000 for v in values if v is not None]


def throughput_series(
    results: Sequence[RequestResult], bin_s: float = 1.0
) -> list[tuple[float, float]]:
    """Output tokens per second per time bin (by chunk arrival), for the report."""
    bins: dict[int, int] = {}
    for r in results:
        for off, k in zip(r.chunk_offsets_s, r.chunk_tokens, strict=False):
            b = int((r.sent_offset_s + off) // bin_s)
            bins[b] = bins.get(b, 0) + k
    if not bins:
        return []
    return [(b * bin_s, bins.get(b, 0) / bin_s) for b in range(min(bins), max(bins) + 1)]


def error_cause(r: RequestResult) -> str | None:
    """Why a request failed, coarse enough to count: the HTTP status (`401`, `429`, `503`),
    `connect` (refused, DNS, TLS), `timeout`, `disconnected`, `incomplete` (a stream without
    [DONE]), `body` (an error inside a 2xx answer), else the exception's type."""
    if r.ok:
        return None
    if r.status is not None and r.status >= 400:
        return str(r.status)
    err = r.error or ""
    if r.status is None:
        name = err.split(":", 1)[0]
        if "Connector" in name or "SSL" in name or name == "ConnectionRefusedError":
            return "connect"
        if "Timeout" in name:
            return "timeout"
        if "Disconnected" in name or "Payload" in name or name == "ConnectionResetError":
            return "disconnected"
        return name or "error"
    return "incomplete" if err.startswith("stream ended without") else "body"


def errors_by_cause(results: Iterable[RequestResult]) -> dict[str, int]:
    """Failed requests counted by `error_cause`, most frequent first."""
    counts: dict[str, int] = {}
    for r in results:
        cause = error_cause(r)
        if cause is not None:
            counts[cause] = counts.get(cause, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def summarize(
    results: Sequence[RequestResult],
    slos: Sequence[Slo] = (),
    token_source: str = "server",
    pcts: Sequence[float] = PERCENTILES,
) -> dict[str, Any]:
    if not results:
        return {"requests": 0}
    ok = [r for r in results if r.ok]
    duration = _duration_s(results)
    summary: dict[str, Any] = {
        **_outcomes(results, ok),
        "duration_s": duration,
        **_throughput(ok, duration, token_source),
        "token_source": token_source,
        "ms": _latencies_ms(results, ok, token_source, pcts),
        "output_length": _output_length(ok, token_source),
        "token_counts": _token_counts(ok),
        "heartbeats": sum(r.heartbeats for r in results),
    }
    if slos:
        summary["goodput"] = _slo_check(results, slos, duration, token_source)
    return summary


def _duration_s(results: Sequence[RequestResult]) -> float:
    """From the first send to the last end (never 0: figures are divided by it)."""
    start = min(r.sent_offset_s for r in results)
    end = max(r.end_offset_s for r in results)
    return max(end - start, 1e-9)


def _outcomes(results: Sequence[RequestResult], ok: Sequence[RequestResult]) -> dict[str, Any]:
    """How the requests ended: completed, failed (and why), refused with 429."""
    return {
        "requests": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "error_rate": (len(results) - len(ok)) / len(results),
        "errors_by_cause": errors_by_cause(results),
        "rate_limited": sum(r.rate_limited for r in results),
        "rate_limited_rate": sum(r.rate_limited for r in results) / len(results),
    }


def _throughput(
    ok: Sequence[RequestResult], duration: float, token_source: str
) -> dict[str, float]:
    """Requests and tokens per second over the run, and the token totals they come from."""
    out_tokens = sum(r.output_tokens(token_source) for r in ok)
    in_tokens = sum(r.prompt_tokens_server or r.prompt_tokens_client for r in ok)
    return {
        "request_throughput_rps": len(ok) / duration,
        "output_token_throughput_tps": out_tokens / duration,
        "total_token_throughput_tps": (out_tokens + in_tokens) / duration,
        "output_tokens": out_tokens,
        "prompt_tokens": in_tokens,
    }


def _latencies_ms(
    results: Sequence[RequestResult],
    ok: Sequence[RequestResult],
    token_source: str,
    pcts: Sequence[float],
) -> dict[str, dict[str, float]]:
    """The distribution of every latency, in ms: successful requests only, but for the
    dispatch lag (every request) and the refusal time (the refused ones)."""

    def dist(xs: Iterable[float | None]) -> dict[str, float]:
        return distribution(_ms(xs), pcts)

    return {
        "ttfb": dist(r.ttfb_s for r in ok),
        "ttft": dist(r.ttft_s for r in ok),
        "icl": dist(x for r in ok for x in r.icl_s),
        "itl": dist(x for r in ok for x in r.itl_s),
        "tpot": dist(r.tpot_s(token_source) for r in ok),
        "e2e": dist(r.e2e_s for r in ok),
        "ttft_sched": dist(r.ttft_sched_s for r in ok),
        "e2e_sched": dist(r.e2e_sched_s for r in ok),
        "dispatch_lag": dist(r.dispatch_lag_s for r in results),
        # How long a refused request took to be refused (429), from its send.
        "refusal": dist(r.e2e_s for r in results if r.rate_limited),
    }


def _output_length(ok: Sequence[RequestResult], token_source: str) -> dict[str, Any]:
    """Output tokens asked for against those received."""
    realised = [r.output_tokens(token_source) for r in ok]
    requested = [r.requested_output_tokens for r in ok]
    short = sum(1 for a, b in zip(realised, requested, strict=True) if a < b)
    return {
        # None, not NaN, without a successful request
        "requested_mean": sum(requested) / len(requested) if requested else None,
        "realised_mean": sum(realised) / len(realised) if realised else None,
        "requests_shorter_than_requested": short,
    }


def _token_counts(ok: Sequence[RequestResult]) -> dict[str, Any]:
    """The server's output token counts against the client's, where both counted."""
    both = [
        r for r in ok if r.output_tokens_server is not None and r.output_tokens_client is not None
    ]
    disagree = [
        r
        for r in both
        if abs((r.output_tokens_server or 0) - (r.output_tokens_client or 0))
        > DISAGREEMENT_TOLERANCE * max(r.output_tokens_server or 0, 1)
    ]
    return {
        "compared": len(both),
        "server_total": sum(r.output_tokens_server or 0 for r in both),
        "client_total": sum(r.output_tokens_client or 0 for r in both),
        "disagreeing_requests": len(disagree),
        "disagreement": bool(disagree),
    }


def _slo_check(
    results: Sequence[RequestResult], slos: Sequence[Slo], duration: float, token_source: str
) -> dict[str, Any]:
    """Goodput under `slos`, each SLO's value over the run, and whether all were met."""
    gp = goodput(results, slos, duration, token_source)
    checks = {s.describe(): s.run_value_ms(results, token_source) for s in slos}
    return {
        **gp,
        "slos": [s.describe() for s in slos],
        "run_values_ms": checks,
        "met": all(v <= s.threshold_ms for s, v in zip(slos, checks.values(), strict=True)),
    }
