"""The load-test harness against the real stack: a short closed-loop run in both dialects."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest import client
from loadtest.metrics import summarize
from loadtest.schedule import ClosedLoop
from loadtest.targets import Dialect, Target
from loadtest.workloads import HFTokenizer, LengthDist, synthetic
from tests.cluster.conftest import ACCOUNT, MODEL, TOKEN, Cluster

pytestmark = pytest.mark.cluster


@pytest.mark.parametrize("dialect", [Dialect.WORKERS_AI, Dialect.OPENAI_CHAT])
def test_short_closed_loop_run(cluster: Cluster, tiny_qwen2_dir: Path, dialect: Dialect) -> None:
    tok = HFTokenizer(tiny_qwen2_dir)
    sessions = synthetic(tok, 8, LengthDist.parse("16"), LengthDist.parse("12"), seed=1)
    target = Target(cluster.url, dialect, MODEL, token=TOKEN, account=ACCOUNT)
    out = client.run(target, sessions, ClosedLoop(4), tokenizer=tok, timeout_s=120)
    s = summarize(out.results)
    assert s["completed"] == 8, [r.error for r in out.results]
    assert s["output_token_throughput_tps"] > 0
    # The random-weight model can end a reply with tokens that decode to no text at
    # all; such a reply has no first content-bearing event, so no TTFT.
    with_text = [r for r in out.results if r.text]
    assert len(with_text) >= len(out.results) // 2
    for r in out.results:
        assert r.ttfb_s is not None and 0 < r.ttfb_s <= r.e2e_s
        assert (r.ttft_s is not None) == bool(r.text)
        if r.ttft_s is not None:
            assert r.ttfb_s <= r.ttft_s <= r.e2e_s
        assert r.output_tokens_server is not None and 0 < r.output_tokens_server <= 12
        assert len(r.chunk_offsets_s) >= (1 if r.text else 0)
        # raw prompts on the Workers AI route: the server counts exactly the asked tokens
        if dialect is Dialect.WORKERS_AI:
            assert r.prompt_tokens_server == r.prompt_tokens_client == 16
    assert s["ms"]["itl"]["count"] > 0
