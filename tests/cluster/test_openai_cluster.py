"""The OpenAI dialect against real vLLM: the official SDK at both prefixes."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.cluster.conftest import ACCOUNT, MODEL, TOKEN, Cluster

pytestmark = pytest.mark.cluster

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(params=["/v1", f"/client/v4/accounts/{ACCOUNT}/ai/v1"], ids=["v1", "account"])
def sdk(request: pytest.FixtureRequest, cluster: Cluster) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{cluster.url}{request.param}", api_key=TOKEN, max_retries=0, timeout=120
    ) as client:
        yield client


def test_stream_equals_non_stream_at_temperature_0(sdk: openai.OpenAI) -> None:
    plain = sdk.chat.completions.create(model=MODEL, messages=HI, max_tokens=16, temperature=0)
    assert plain.usage is not None and plain.usage.completion_tokens > 0
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=HI,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_completions_and_models(sdk: openai.OpenAI) -> None:
    out = sdk.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4)
    # The random-weight model's tokens may decode to no text; tokens must still come back.
    assert isinstance(out.choices[0].text, str)
    assert out.usage is not None and 0 < out.usage.completion_tokens <= 4
    assert [m.id for m in sdk.models.list()] == [MODEL]
    assert sdk.models.retrieve(MODEL).id == MODEL


def test_json_schema_output_parses(sdk: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    out = sdk.chat.completions.create(
        model=MODEL,
        messages=HI,
        max_tokens=64,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
    )
    assert out.choices[0].finish_reason == "stop", out.choices[0].message.content
    parsed = json.loads(out.choices[0].message.content or "")
    assert isinstance(parsed, dict) and isinstance(parsed["ok"], bool)


def test_typed_errors(sdk: openai.OpenAI, cluster: Cluster) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model=MODEL, messages=HI, temperature=3)
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="@cf/meta/nope", messages=HI)
    with (
        openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="wrong", max_retries=0) as bad,
        pytest.raises(openai.AuthenticationError),
    ):
        bad.models.list()


def test_batches_of_text_and_token_id_prompts(sdk: openai.OpenAI) -> None:
    """/v1/completions' batch and token-id forms on real vLLM: choices in OpenAI's order
    (prompt p's at p*n ..), each prompt counted once, ids checked against the vocabulary."""
    texts = ["Once upon a time", "The sea"]
    alone = [sdk.completions.create(model=MODEL, prompt=t, max_tokens=2) for t in texts]
    batch = sdk.completions.create(model=MODEL, prompt=texts, max_tokens=2, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.usage is not None
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone if a.usage)
    assert 0 < batch.usage.completion_tokens <= 8
    ids = sdk.completions.create(model=MODEL, prompt=[[5, 6, 7], [8, 9]], max_tokens=2)
    assert [c.index for c in ids.choices] == [0, 1]
    assert ids.usage is not None and ids.usage.prompt_tokens == 5
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.completions.create(model=MODEL, prompt=[5, 10**6], max_tokens=2)
    assert caught.value.param == "prompt" and "out of vocabulary" in caught.value.message
