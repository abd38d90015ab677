from __future__ import annotations

import math

import pytest

from loadtest.metrics import Slo, goodput, percentile, summarize
from loadtest.records import RequestResult


def result(
    rid: int = 0,
    *,
    sent: float = 0.0,
    lag: float = 0.0,
    ttft: float | None = 0.1,
    chunks: list[float] | None = None,
    tokens: list[int] | None = None,
    error: str | None = None,
    status: int | None = 200,
    server: int | None = None,
    client: int | None = None,
) -> RequestResult:
    chunks = chunks if chunks is not None else [0.1, 0.2, 0.3]
    tokens = tokens if tokens is not None else [1] * len(chunks)
    e2e = chunks[-1] + 0.01 if chunks else 0.5
    return RequestResult(
        id=rid, session=rid, turn=0, status=status, error=error,
        intended_offset_s=sent - lag, sent_offset_s=sent, end_offset_s=sent + e2e,
        dispatch_lag_s=lag, ttfb_s=0.05, ttft_s=None if error else ttft, e2e_s=e2e,
        chunk_offsets_s=chunks, chunk_tokens=tokens, requested_output_tokens=sum(tokens),
        output_tokens_server=sum(tokens) if server is None else server,
        output_tokens_client=sum(tokens) if client is None else client,
        prompt_tokens_server=10, prompt_tokens_client=10,
    )  # fmt: skip


def test_percentiles_match_hand_computed_values() -> None:
    v = [15.0, 20.0, 35.0, 40.0, 50.0]
    assert percentile(v, 0) == 15.0
    assert percentile(v, 100) == 50.0
    assert percentile(v, 50) == 35.0
    assert percentile(v, 40) == 29.0  # rank 1.6: 20 + 0.6 * 15
    assert percentile(v, 90) == 46.0  # rank 3.6: 40 + 0.6 * 10
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_itl_is_normalised_by_tokens_per_chunk_and_tpot() -> None:
    r = result(chunks=[0.1, 0.2, 0.5], tokens=[2, 1, 3])
    assert r.icl_s == pytest.approx([0.1, 0.3])
    assert r.itl_s == pytest.approx([0.1, 0.1, 0.1, 0.1])
    assert r.tpot_s() == pytest.approx(0.4 / 5)


def test_coordinated_omission_adds_the_dispatch_lag() -> None:
    r = result(sent=1.0, lag=0.25, ttft=0.1)
    assert r.ttft_sched_s == pytest.approx(0.35)
    assert r.e2e_sched_s == pytest.approx(r.e2e_s + 0.25)
    s = summarize([r, result(1, sent=2.0, lag=0.0, ttft=0.1)])
    assert s["ms"]["ttft"]["p50"] == pytest.approx(100)
    assert s["ms"]["ttft_sched"]["max"] == pytest.approx(350)
    assert s["ms"]["dispatch_lag"]["max"] == pytest.approx(250)


def test_goodput_counts_errors_as_misses() -> None:
    rs = [
        result(0, ttft=0.1),
        result(1, ttft=0.3),  # misses the TTFT SLO
        result(2, error="HTTP 429", status=429, chunks=[], tokens=[]),
        result(3, ttft=0.1, chunks=[0.1, 0.2, 0.9]),  # ITL p99 0.7 s misses
    ]
    slos = [Slo.parse("ttft:p99<=200"), Slo.parse("itl:p99<=500")]
    gp = goodput(rs, slos, duration_s=2.0)
    assert gp["good_requests"] == 1
    assert gp["attainment"] == 0.25
    assert gp["goodput_rps"] == 0.5
    s = summarize(rs, slos)
    assert s["errors"] == 1 and s["rate_limited"] == 1 and s["rate_limited_rate"] == 0.25
    assert s["goodput"]["met"] is False
    assert s["goodput"]["run_values_ms"]["ttft:p99<=200ms"] == math.inf


def test_slo_parse() -> None:
    assert Slo.parse("ttft:p90<=250") == Slo("ttft", 250.0, 90.0)
    assert Slo.parse("e2e<2000ms") == Slo("e2e", 2000.0, 99.0)
    with pytest.raises(ValueError):
        Slo.parse("latency<=3")


def test_token_count_disagreement_is_flagged_and_throughput() -> None:
    agree = result(0, chunks=[0.1, 0.2], server=2, client=2)
    differ = result(1, sent=0.5, chunks=[0.1, 0.2], server=2, client=5)
    s = summarize([agree, differ])
    assert s["token_counts"]["disagreement"] is True
    assert s["token_counts"]["disagreeing_requests"] == 1
    # 4 server tokens over [0, 0.5 + 0.21] s
    assert s["output_token_throughput_tps"] == pytest.approx(4 / 0.71)
    assert summarize([agree])["token_counts"]["disagreement"] is False
    client_source = summarize([agree, differ], token_source="client")
    assert client_source["output_tokens"] == 7
