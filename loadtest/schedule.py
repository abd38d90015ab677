"""Load models: closed-loop concurrency, or open-loop send deadlines computed up front.

Open-loop deadlines are absolute offsets (seconds from the run's start), so sleeping late
once never shifts the rest of the schedule (the drift of relative sleeps). Random arrival
processes are seeded and rescaled so that the last deadline is exactly (n-1)/rate: the run
asks for precisely the stated rate.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from enum import StrEnum


class Arrival(StrEnum):
    CONSTANT = "constant"
    POISSON = "poisson"
    GAMMA = "gamma"


@dataclass(frozen=True)
class ClosedLoop:
    """`concurrency` requests in flight; each finished one starts the next."""

    concurrency: int

    def describe(self) -> str:
        return f"closed loop, concurrency {self.concurrency}"


@dataclass(frozen=True)
class OpenLoop:
    """Requests sent at precomputed deadlines, whatever the server's state."""

    deadlines: tuple[float, ...]
    rate: float
    label: str

    def describe(self) -> str:
        return f"open loop, {self.label}"


LoadModel = ClosedLoop | OpenLoop


def _rescaled(gaps: list[float], rate: float) -> tuple[float, ...]:
    """Cumulative offsets starting at 0, scaled so the mean gap is exactly 1/rate."""
    offsets = [0.0]
    for g in gaps:
        offsets.append(offsets[-1] + g)
    total = offsets[-1]
    if total <= 0:
        return tuple(i / rate for i in range(len(offsets)))
    scale = (len(gaps) / rate) / total
    return tuple(o * scale for o in offsets)


def open_loop(
    rate: float, n: int, arrival: Arrival = Arrival.POISSON, seed: int = 0, burstiness: float = 1.0
) -> OpenLoop:
    """`n` deadlines at `rate` req/s. Gamma arrivals with shape `burstiness` (< 1: burstier
    than Poisson, > 1: smoother; 1 is Poisson)."""
    if rate <= 0 or n <= 0:
        raise ValueError("rate and n must be positive")
    rng = random.Random(seed)
    if arrival is Arrival.CONSTANT:
        deadlines = tuple(i / rate for i in range(n))
        return OpenLoop(deadlines, rate, f"constant {rate:g} req/s")
    shape = 1.0 if arrival is Arrival.POISSON else burstiness
    if shape <= 0:
        raise ValueError("burstiness must be positive")
    gaps = [rng.gammavariate(shape, 1.0 / (rate * shape)) for _ in range(n - 1)]
    label = f"{arrival.value} {rate:g} req/s, seed {seed}"
    if arrival is Arrival.GAMMA:
        label += f", burstiness {burstiness:g}"
    return OpenLoop(_rescaled(gaps, rate), rate, label)


def linear_ramp(start_rate: float, end_rate: float, duration_s: float) -> OpenLoop:
    """Deadlines whose instantaneous rate goes linearly from start to end over `duration_s`:
    the i-th request is sent when the integral of the rate reaches i."""
    if start_rate < 0 or end_rate < 0 or duration_s <= 0 or start_rate + end_rate <= 0:
        raise ValueError("rates must be >= 0 (not both 0) and duration positive")
    slope = (end_rate - start_rate) / duration_s
    total = (start_rate + end_rate) / 2 * duration_s
    deadlines: list[float] = []
    i = 0
    while i < total:
        if abs(slope) < 1e-12:
            t = i / start_rate
        else:  # start*t + slope*t^2/2 = i
            t = (-start_rate + math.sqrt(start_rate**2 + 2 * slope * i)) / slope
        deadlines.append(t)
        i += 1
    rate = len(deadlines) / duration_s
    label = f"linear ramp {start_rate:g} -> {end_rate:g} req/s over {duration_s:g} s"
    return OpenLoop(tuple(deadlines), rate, label)


@dataclass(frozen=True)
class Delivery:
    asked_rate: float
    achieved_rate: float
    max_dispatch_lag_s: float
    ok: bool


def check_delivery(load: OpenLoop, sent_offsets: list[float], tolerance: float = 0.05) -> Delivery:
    """Did the client send at the asked rate? `sent_offsets` are the actual send times (s from
    the run's start). Under-delivery beyond `tolerance` fails the run."""
    if len(sent_offsets) < 2:
        return Delivery(load.rate, load.rate, 0.0, True)
    span = max(sent_offsets) - min(sent_offsets)
    intended_span = load.deadlines[len(sent_offsets) - 1] - load.deadlines[0]
    asked = (len(sent_offsets) - 1) / intended_span if intended_span > 0 else math.inf
    achieved = (len(sent_offsets) - 1) / span if span > 0 else math.inf
    lags = [s - d for s, d in zip(sorted(sent_offsets), load.deadlines, strict=False)]
    return Delivery(asked, achieved, max(lags), achieved >= asked * (1 - tolerance))
