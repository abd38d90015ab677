from __future__ import annotations

import statistics

import pytest

from loadtest.schedule import Arrival, check_delivery, linear_ramp, open_loop


def test_constant_deadlines_are_exact() -> None:
    load = open_loop(4.0, 5, Arrival.CONSTANT)
    assert load.deadlines == (0.0, 0.25, 0.5, 0.75, 1.0)


@pytest.mark.parametrize(("arrival", "shape"), [(Arrival.POISSON, 1.0), (Arrival.GAMMA, 0.25)])
def test_random_arrivals_hit_the_rate_exactly_and_reproduce(arrival: Arrival, shape: float) -> None:
    n, rate = 4001, 20.0
    a = open_loop(rate, n, arrival, seed=7, burstiness=shape)
    assert a.deadlines == open_loop(rate, n, arrival, seed=7, burstiness=shape).deadlines
    assert a.deadlines != open_loop(rate, n, arrival, seed=8, burstiness=shape).deadlines
    assert a.deadlines[0] == 0.0
    assert a.deadlines[-1] == pytest.approx((n - 1) / rate, rel=1e-12)
    gaps = [y - x for x, y in zip(a.deadlines, a.deadlines[1:], strict=False)]
    assert all(g >= 0 for g in gaps)
    # coefficient of variation: 1 for Poisson, 1/sqrt(shape) for gamma
    cv = statistics.pstdev(gaps) / statistics.fmean(gaps)
    assert cv == pytest.approx(shape**-0.5, rel=0.1)


def test_linear_ramp_integrates_the_rate() -> None:
    load = linear_ramp(0.0, 20.0, 10.0)  # integral = 100 requests
    assert len(load.deadlines) == 100
    assert load.deadlines[0] == 0.0
    # the i-th request is sent when 0.5 * 2 * t^2 = i  ->  t = sqrt(i)
    assert load.deadlines[25] == pytest.approx(5.0)
    assert load.deadlines[81] == pytest.approx(9.0)
    flat = linear_ramp(5.0, 5.0, 2.0)
    assert flat.deadlines == pytest.approx([i / 5 for i in range(10)])


def test_delivery_check_fails_an_under_delivering_run() -> None:
    load = open_loop(10.0, 11, Arrival.CONSTANT)
    on_time = [d + 0.001 for d in load.deadlines]
    assert check_delivery(load, on_time).ok
    slow = [d * 1.2 for d in load.deadlines]  # 8.3 req/s instead of 10
    result = check_delivery(load, slow)
    assert not result.ok
    assert result.achieved_rate == pytest.approx(10 / 1.2)
    assert result.max_dispatch_lag_s == pytest.approx(0.2)
