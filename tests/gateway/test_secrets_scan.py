"""No token, prompt or completion text in logs, /metrics or error messages.

Requests of every kind (both dialects, streaming or not, successes, auth failures with
wrong, foreign and malformed tokens, bad input built from the prompt, an engine failure,
a timeout) run with every logger captured at DEBUG; then the captured log text, the
/metrics exposition and every error response are scanned for the secrets."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import httpx
import pytest

from serve.cluster import build_gateway
from serve.gateway.tenants import hash_token
from serve.settings import Settings
from tests.fakes import FakeEngine
from tests.gateway.conftest import ACCOUNT, MODEL, RUN_URL, TOKEN

PROMPT = "PROMPT-SECRET-7f3a9c"
REPLY = "COMPLETION-SECRET-b81e42 and more words"
WRONG_TOKEN = "WRONG-TOKEN-SECRET-55d0"
SECRETS = (TOKEN, PROMPT, "COMPLETION-SECRET-b81e42", WRONG_TOKEN)
OTHER_ACCOUNT = "acct-someone-else"


@pytest.fixture
async def clients(
    settings: Settings,
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient, httpx.AsyncClient]]:
    """A healthy engine, a failing one, and a stalled one (for the request timeout)."""
    apps = [
        build_gateway(settings, FakeEngine(reply=REPLY)),
        build_gateway(settings, FakeEngine(reply=REPLY, fail_after=1)),
        build_gateway(
            settings.model_copy(update={"request_timeout_s": 0.2}),
            FakeEngine(reply=REPLY, delay_s=3600),
        ),
    ]
    clients = [
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
        for app in apps
    ]
    async with clients[0], clients[1], clients[2]:
        yield clients[0], clients[1], clients[2]


def bodies() -> list[tuple[str, dict[str, object]]]:
    chat = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}
    return [
        (RUN_URL, {"prompt": PROMPT}),
        (RUN_URL, {"prompt": PROMPT, "stream": True}),
        (RUN_URL, {"messages": [{"role": "user", "content": PROMPT}]}),
        ("/v1/chat/completions", chat),
        (
            "/v1/chat/completions",
            {**chat, "stream": True, "stream_options": {"include_usage": True}},
        ),
        ("/v1/completions", {"model": MODEL, "prompt": PROMPT}),
    ]


def bad_bodies() -> list[tuple[str, dict[str, object]]]:
    """Invalid requests whose offending values are (or contain) the prompt."""
    return [
        (RUN_URL, {"prompt": PROMPT * 20_000}),  # over the prompt length limit
        (RUN_URL, {"prompt": PROMPT, "messages": [{"role": "user", "content": PROMPT}]}),
        (RUN_URL, {"messages": [{"role": PROMPT, "content": [PROMPT]}]}),
        (RUN_URL, {"prompt": PROMPT, "temperature": PROMPT}),
        (RUN_URL, {"prompt": PROMPT, "response_format": {"type": PROMPT}}),
        # (Unknown model names are echoed, as the hosted API does: not a secret.)
        (
            "/v1/chat/completions",
            {"model": "nope", "messages": [{"role": "user", "content": PROMPT}]},
        ),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": PROMPT, "content": 1}]}),
        ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": PROMPT}),
    ]


async def test_no_secret_in_logs_metrics_or_errors(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient, httpx.AsyncClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("batchserve", "serve", "httpx", "uvicorn", "fastapi"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    healthy, failing, stalled = clients
    auth = {"Authorization": f"Bearer {TOKEN}"}
    auth_failures = [
        {"Authorization": f"Bearer {WRONG_TOKEN}"},
        {"Authorization": WRONG_TOKEN},
        {"Authorization": f"Basic {WRONG_TOKEN}"},
        {"X-Auth-Key": WRONG_TOKEN},
        {},
    ]
    errors: list[str] = []
    successes = 0
    for path, body in bodies():
        r = await healthy.post(path, headers=auth, json=body)
        assert r.status_code == 200, r.text
        assert "COMPLETION-SECRET-b81e42" in r.text  # the scan below would see it if leaked
        successes += 1
        for client in (failing, stalled):  # engine failure, request timeout
            r = await client.post(path, headers=auth, json=body)
            assert r.status_code in (200, 408, 500), r.text
            errors.append(r.text.replace("COMPLETION-SECRET-b81e42 ", "", 1))
        for headers in auth_failures:
            r = await healthy.post(path, headers=headers, json=body)
            assert r.status_code in (400, 401), r.text
            errors.append(r.text)
        foreign = path.replace(f"/accounts/{ACCOUNT}/", f"/accounts/{OTHER_ACCOUNT}/")
        if foreign != path:
            r = await healthy.post(foreign, headers=auth, json=body)
            assert r.status_code == 403, r.text
            errors.append(r.text)
    for path, body in bad_bodies():
        r = await healthy.post(path, headers=auth, json=body)
        assert 400 <= r.status_code < 500, r.text
        errors.append(r.text)
    assert successes == 6 and len(errors) > 50

    metrics = "\n".join([(await c.get("/metrics")).text for c in clients])
    assert "batchserve_" in metrics
    logs = "\n".join([caplog.text, *(str(r.__dict__) for r in caplog.records)])
    assert "batchserve.access" in logs  # access lines were captured
    token_hash = hash_token(TOKEN)
    for where, text in (("logs", logs), ("metrics", metrics), ("errors", "\n".join(errors))):
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} leaked into {where}"
        assert token_hash not in text, f"the token hash leaked into {where}"
