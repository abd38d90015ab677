"""Workers AI streams on a real socket (uvicorn on 127.0.0.1, fake engine): padding,
heartbeats while no token has come yet, and a client leaving during that wait."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from langchain_community.llms.cloudflare_workersai import CloudflareWorkersAI

from serve.gateway.workers_ai_routes import PAD_ALPHABET
from serve.settings import Settings
from tests.fakes import FakeEngine
from tests.gateway.conftest import ACCOUNT, AUTH, MODEL, RUN_URL, TOKEN
from tests.live_server import live

Serve = Callable[..., Any]


def configured(settings: Settings, **changes: Any) -> Settings:
    return settings.model_copy(update=changes)


def frames(base: str, body: dict[str, Any]) -> list[str]:
    """Every SSE frame of one streamed request, in order (comments included)."""
    with httpx.stream(
        "POST", base + RUN_URL, headers=AUTH, json={**body, "stream": True}, timeout=30
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream"
        raw = r.read().decode()
    assert raw.endswith("\n\n")
    return raw.split("\n\n")[:-1]


def payloads(all_frames: list[str]) -> list[dict[str, Any]]:
    data = [f.removeprefix("data: ") for f in all_frames if f.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_no_padding_by_default(settings: Settings, engine: FakeEngine) -> None:
    with live(settings, engine) as base:
        events = payloads(frames(base, {"prompt": "hi", "max_tokens": 12}))
    assert all("p" not in e for e in events)
    assert all(set(e) <= {"response", "usage", "finish_reason"} for e in events)


def test_padding_on_every_event(settings: Settings, engine: FakeEngine) -> None:
    with live(configured(settings, stream_padding=True), engine) as base:
        events = payloads(frames(base, {"prompt": "hi", "max_tokens": 12}))
    assert len(events) == 13
    pads = [e["p"] for e in events]
    assert all(p and PAD_ALPHABET.startswith(p) for p in pads), pads
    assert len({len(p) for p in pads}) > 1, "padding lengths must vary"
    assert "".join(e["response"] for e in events) == engine.reply
    assert events[-1]["usage"]["completion_tokens"] == 12


def test_heartbeats_until_the_first_token_only(settings: Settings) -> None:
    engine = FakeEngine(reply="a b c", delay_s=0.3)
    with live(configured(settings, stream_heartbeat_s=0.05), engine) as base:
        got = frames(base, {"prompt": "hi"})
    first_data = next(i for i, f in enumerate(got) if f.startswith("data: "))
    assert first_data >= 1, got  # about 6 on an idle machine; timers slip under load
    assert got[:first_data] == [":"] * first_data
    # Tokens 2 and 3 also took 0.3 s each, but once tokens flow nothing is timed.
    assert all(f.startswith("data: ") for f in got[first_data:]), got
    assert "".join(e["response"] for e in payloads(got)) == "a b c"


def test_no_heartbeat_when_the_first_token_is_quick(settings: Settings) -> None:
    engine = FakeEngine(reply="a b c", delay_s=0.01)
    with live(configured(settings, stream_heartbeat_s=2.0), engine) as base:
        got = frames(base, {"prompt": "hi"})
    assert all(f.startswith("data: ") for f in got), got


def test_leaving_during_the_wait_aborts_the_engine_request(settings: Settings) -> None:
    engine = FakeEngine(reply="a b c", delay_s=30)
    with live(configured(settings, stream_heartbeat_s=0.05), engine) as base:
        with httpx.stream(
            "POST", base + RUN_URL, headers=AUTH, json={"prompt": "hi", "stream": True}
        ) as r:
            lines = r.iter_lines()  # keep the iterator: dropping it closes the stream
            assert next(lines) == ":"
            assert len(engine.running) == 1
        deadline = time.monotonic() + 5
        while not engine.aborted:
            assert time.monotonic() < deadline, "the engine request outlived its client"
            time.sleep(0.02)
        assert not engine.running and not engine.finished


@pytest.mark.parametrize("padding", [False, True])
def test_langchain_streams_through_heartbeats_and_padding(
    settings: Settings, padding: bool
) -> None:
    """LangChain json-decodes every line longer than `data: `: our extras must not break it."""
    engine = FakeEngine(reply="one two three", delay_s=0.2)
    tokens: list[str] = []

    class Collect:
        def on_llm_new_token(self, token: str, **_: Any) -> None:
            tokens.append(token)

    from langchain_core.callbacks import BaseCallbackHandler

    handler = type("Handler", (Collect, BaseCallbackHandler), {})()
    changed = configured(settings, stream_heartbeat_s=0.05, stream_padding=padding)
    with live(changed, engine) as base:
        llm = CloudflareWorkersAI(
            account_id=ACCOUNT,
            api_token=TOKEN,
            model=MODEL,
            base_url=f"{base}/client/v4/accounts",
            streaming=True,
        )
        text = llm.invoke("hi", config={"callbacks": [handler]})
    assert text == "one two three"
    assert "".join(tokens) == "one two three"
