"""The client against the in-process mock: TTFT and ITL maths with known delays."""

from __future__ import annotations

import statistics

import pytest

from loadtest import client
from loadtest.metrics import summarize
from loadtest.mock import MockConfig
from loadtest.schedule import Arrival, ClosedLoop, open_loop
from loadtest.targets import Dialect, Target
from loadtest.workloads import Session, UserTurn, WordTokenizer
from tests.loadtest.conftest import MockFactory


def sessions(n: int, max_tokens: int, turns: int = 1) -> list[Session]:
    turn = UserTurn("the sea", 2, max_tokens)
    return [Session(i, (turn,) * turns) for i in range(n)]


@pytest.mark.parametrize("dialect", list(Dialect))
def test_ttft_and_itl_from_known_delays(mock_server: MockFactory, dialect: Dialect) -> None:
    url = mock_server(MockConfig(ttft_s=0.12, itl_s=0.02, tokens_per_chunk=3))
    out = client.run(Target(url, dialect, "m"), sessions(6, 12), ClosedLoop(3))
    s = summarize(out.results)
    assert s["completed"] == 6 and s["errors"] == 0
    # TTFT is the first content chunk, not the (chat) role prelude or the heartbeat
    # (the mock starts its clock after reading the request, so never earlier than 120 ms)
    assert s["ms"]["ttft"]["min"] >= 120 and s["ms"]["ttft"]["p50"] < 170
    assert s["ms"]["ttfb"]["p50"] < 60
    # 3 tokens per chunk every 60 ms: inter-chunk 60 ms, per-token 20 ms
    assert s["ms"]["icl"]["p50"] == pytest.approx(60, abs=6)
    assert s["ms"]["itl"]["p50"] == pytest.approx(20, abs=2)
    assert all(r.chunk_tokens == [3, 3, 3, 3] for r in out.results)
    # TPOT = (last - first content) / (12 - 1) = 180 ms / 11
    assert s["ms"]["tpot"]["p50"] == pytest.approx(180 / 11, abs=2)
    assert s["output_length"]["realised_mean"] == 12
    assert s["heartbeats"] == 6


def test_non_streaming_and_client_token_count(mock_server: MockFactory) -> None:
    url = mock_server(MockConfig(ttft_s=0.05, itl_s=0.01))
    target = Target(url, Dialect.WORKERS_AI, "m", stream=False)
    out = client.run(target, sessions(2, 5), ClosedLoop(2), tokenizer=WordTokenizer())
    assert all(r.ok for r in out.results)
    assert [r.output_tokens_server for r in out.results] == [5, 5]
    # the mock's word "tok" is one word each for the word tokenizer
    assert [r.output_tokens_client for r in out.results] == [5, 5]
    assert summarize(out.results)["ms"]["e2e"]["min"] >= 90  # 50 ms + 4 x 10 ms
    assert all(r.ttft_s == r.chunk_offsets_s[0] for r in out.results)  # the whole body


def test_429_and_errors_are_counted(mock_server: MockFactory) -> None:
    url = mock_server(MockConfig(ttft_s=0.01, itl_s=0.001, rate_limit_every=2))
    out = client.run(Target(url, Dialect.OPENAI_CHAT, "m"), sessions(6, 3), ClosedLoop(1))
    s = summarize(out.results)
    assert s["rate_limited"] == 3 and s["errors"] == 3 and s["error_rate"] == 0.5


def test_multi_turn_sends_the_history(mock_server: MockFactory) -> None:
    url = mock_server(MockConfig(ttft_s=0.01, itl_s=0.001))
    out = client.run(Target(url, Dialect.OPENAI_CHAT, "m"), sessions(2, 4, turns=3), ClosedLoop(2))
    assert sorted((r.session, r.turn) for r in out.results) == [
        (s, t) for s in range(2) for t in range(3)
    ]
    assert all(r.ok and r.text == "tok " * 4 for r in out.results)


def test_open_loop_keeps_the_schedule_and_measures_from_intended_time(
    mock_server: MockFactory,
) -> None:
    url = mock_server(MockConfig(ttft_s=0.02, itl_s=0.002))
    load = open_loop(40.0, 40, Arrival.POISSON, seed=3)
    out = client.run(Target(url, Dialect.WORKERS_AI, "m"), sessions(40, 4), load)
    assert out.delivery is not None and out.delivery.ok
    lags = [r.dispatch_lag_s for r in out.results]
    assert statistics.median(lags) < 0.005
    for r in out.results:
        assert r.intended_offset_s == pytest.approx(load.deadlines[r.session], abs=1e-6)
        assert r.ttft_sched_s == pytest.approx((r.ttft_s or 0) + r.dispatch_lag_s)


def test_worker_processes_split_the_load(mock_server: MockFactory) -> None:
    url = mock_server(MockConfig(ttft_s=0.02, itl_s=0.002))
    out = client.run(Target(url, Dialect.OPENAI_COMPLETIONS, "m"), sessions(8, 4), ClosedLoop(4),
                     workers=2)  # fmt: skip
    assert out.workers == 2
    assert sorted(r.session for r in out.results) == list(range(8))
    assert all(r.ok for r in out.results)
