"""Sweeps: synchronous -> max throughput -> interpolated rates, and an SLO search.

`runner(load, n)` runs one load and returns its summary (see `metrics.summarize`); these
functions only choose the loads, so they are tested without a server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from loadtest.metrics import Slo
from loadtest.schedule import Arrival, ClosedLoop, LoadModel, open_loop

Runner = Callable[[LoadModel, str], dict[str, Any]]
"""Runs a load (the string labels the step) and returns its summary."""


@dataclass(frozen=True)
class SweepStep:
    label: str
    load: str
    rate: float | None
    summary: dict[str, Any]


def interpolated_rates(low: float, high: float, steps: int) -> list[float]:
    """`steps` rates strictly between `low` and `high`, evenly spaced."""
    if steps <= 0 or high <= low:
        return []
    return [low + (high - low) * (i + 1) / (steps + 1) for i in range(steps)]


def sweep(
    runner: Runner,
    requests_per_step: int,
    max_concurrency: int,
    steps: int = 4,
    arrival: Arrival = Arrival.POISSON,
    seed: int = 0,
) -> list[SweepStep]:
    """Synchronous (one stream), then maximum throughput (`max_concurrency` streams), then
    `steps` open-loop rates evenly between the two measured request rates."""
    out: list[SweepStep] = []
    sync = runner(ClosedLoop(1), "synchronous")
    out.append(SweepStep("synchronous", "concurrency 1", None, sync))
    peak = runner(ClosedLoop(max_concurrency), "throughput")
    out.append(SweepStep("throughput", f"concurrency {max_concurrency}", None, peak))
    low, high = sync["request_throughput_rps"], peak["request_throughput_rps"]
    for rate in interpolated_rates(low, high, steps):
        load = open_loop(rate, requests_per_step, arrival, seed)
        out.append(SweepStep(f"{rate:.3g} req/s", load.describe(), rate, runner(load, load.label)))
    return out


def meets(summary: dict[str, Any]) -> bool:
    return bool(summary.get("goodput", {}).get("met", False))


def slo_search(
    runner: Runner,
    slos: Sequence[Slo],
    low: float,
    high: float,
    requests_per_step: int,
    iterations: int = 6,
    arrival: Arrival = Arrival.POISSON,
    seed: int = 0,
) -> tuple[float | None, list[SweepStep]]:
    """The highest open-loop rate in [low, high] whose run meets every SLO (bisection on rate;
    the runner's summaries must carry `goodput.met`). None if even `low` misses."""
    if not slos:
        raise ValueError("an SLO search needs at least one SLO")
    steps: list[SweepStep] = []

    def probe(rate: float) -> bool:
        load = open_loop(rate, requests_per_step, arrival, seed)
        summary = runner(load, load.label)
        steps.append(SweepStep(f"{rate:.3g} req/s", load.describe(), rate, summary))
        return meets(summary)

    if not probe(low):
        return None, steps
    if probe(high):
        return high, steps
    good, bad = low, high
    for _ in range(iterations):
        mid = (good + bad) / 2
        if probe(mid):
            good = mid
        else:
            bad = mid
    return good, steps
