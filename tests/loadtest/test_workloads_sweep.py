from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from loadtest.metrics import Slo
from loadtest.schedule import ClosedLoop, LoadModel, OpenLoop
from loadtest.sweep import interpolated_rates, slo_search, sweep
from loadtest.targets import Dialect, Target, Turn
from loadtest.workloads import (
    HFTokenizer,
    LengthDist,
    exact_text,
    multi_turn,
    shared_prefix,
    sharegpt,
    synthetic,
)


@pytest.fixture(scope="module")
def tok(tiny_qwen2_dir: Path) -> HFTokenizer:
    return HFTokenizer(tiny_qwen2_dir)


def test_exact_token_lengths_with_the_served_tokenizer(tok: HFTokenizer) -> None:
    rng = random.Random(1)
    for n in (1, 7, 64, 300):
        assert len(tok.encode(exact_text(tok, n, rng))) == n
    sessions = synthetic(tok, 10, LengthDist.parse("5-50"), LengthDist.parse("16"), seed=3)
    assert sessions == synthetic(tok, 10, LengthDist.parse("5-50"), LengthDist.parse("16"), 3)
    for s in sessions:
        (turn,) = s.turns
        assert len(tok.encode(turn.text)) == turn.prompt_tokens and 5 <= turn.prompt_tokens <= 50


def test_shared_prefix_and_multi_turn(tok: HFTokenizer) -> None:
    sp = shared_prefix(tok, 6, 2, 32, LengthDist.parse("8"), LengthDist.parse("4"))
    assert len({s.system for s in sp}) == 2
    assert all(s.system and len(tok.encode(s.system)) == 32 for s in sp)
    mt = multi_turn(tok, 3, 4, LengthDist.parse("8"), LengthDist.parse("4"))
    assert all(len(s.turns) == 4 for s in mt)


def test_sharegpt_file(tmp_path: Path, tok: HFTokenizer) -> None:
    conv = [{"from": "human", "value": "Hello there, how are you?"},
            {"from": "gpt", "value": "I am fine, thank you."},
            {"from": "human", "value": "Count to ten."},
            {"from": "gpt", "value": "one, two, three"}]  # fmt: skip
    path = tmp_path / "sg.json"
    path.write_text(json.dumps([{"conversations": conv}] * 3))
    single = sharegpt(path, tok, 2)
    assert len(single) == 2 and len(single[0].turns) == 1
    assert single[0].turns[0].max_tokens == len(tok.encode("I am fine, thank you."))
    assert len(sharegpt(path, tok, 1, multi_turn=True)[0].turns) == 2


def test_targets_force_output_and_parse_both_dialects() -> None:
    chat = Target("http://h", Dialect.OPENAI_CHAT, "m", token="t", force_output=True)
    req = chat.request(Turn((("user", "hi"),), None, 9))
    body = json.loads(req.body)
    assert req.url == "http://h/v1/chat/completions"
    assert body["ignore_eos"] is True and body["min_tokens"] == 9 and body["max_tokens"] == 9
    assert body["stream_options"] == {"include_usage": True}
    assert req.headers["Authorization"] == "Bearer t"
    assert not chat.parse_event(
        '{"choices":[{"delta":{"role":"assistant","content":""}}]}'
    ).content_bearing
    assert chat.parse_event('{"choices":[{"delta":{"reasoning_content":"hm"}}]}').content_bearing
    wai = Target("http://h", Dialect.WORKERS_AI, "@cf/x", account="acc")
    raw = json.loads(wai.request(Turn(None, "abc", 3)).body)
    assert raw == {"max_tokens": 3, "stream": True, "prompt": "abc", "raw": True}
    assert wai.request(Turn(None, "abc", 3)).url == "http://h/client/v4/accounts/acc/ai/run/@cf/x"
    usage = wai.parse_event('{"response":"","usage":{"prompt_tokens":3,"completion_tokens":5}}')
    assert (usage.prompt_tokens, usage.completion_tokens, usage.content_bearing) == (3, 5, False)
    assert wai.parse_event("[DONE]").done
    assert wai.parse_event('{"response":"","errors":[{"code":3040}]}').error
    body_err = wai.parse_body(b'{"success":false,"errors":[{"code":1}],"result":null}')
    assert body_err.error


def fake_runner(capacity: float) -> tuple[Any, list[str]]:
    """A server that keeps up to `capacity` req/s: TTFT grows past it."""
    seen: list[str] = []

    def run(load: LoadModel, label: str) -> dict[str, Any]:
        seen.append(label)
        if isinstance(load, ClosedLoop):
            rps = min(load.concurrency * 1.0, capacity)
            return {"request_throughput_rps": rps, "ms": {"ttft": {"p50": 1, "p99": 1}}}
        assert isinstance(load, OpenLoop)
        ttft = 100.0 if load.rate <= capacity * 0.8 else 1000.0
        return {"request_throughput_rps": load.rate, "ms": {"ttft": {"p50": ttft, "p99": ttft}},
                "goodput": {"met": ttft <= 200}}  # fmt: skip

    return run, seen


def test_sweep_and_slo_search() -> None:
    assert interpolated_rates(1, 5, 3) == [2, 3, 4]
    run, seen = fake_runner(10.0)
    steps = sweep(run, requests_per_step=50, max_concurrency=32, steps=3)
    assert seen[:2] == ["synchronous", "throughput"]
    assert [s.rate for s in steps[2:]] == pytest.approx([3.25, 5.5, 7.75])
    run, seen = fake_runner(10.0)
    best, probes = slo_search(run, [Slo.parse("ttft:p99<=200")], 1.0, 20.0, 50, iterations=8)
    assert best is not None and 7.9 < best <= 8.0
    assert probes[0].rate == 1.0 and probes[1].rate == 20.0
    assert slo_search(fake_runner(0.5)[0], [Slo.parse("ttft<=200")], 1.0, 2.0, 5)[0] is None
