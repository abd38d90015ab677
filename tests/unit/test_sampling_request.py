"""Each dialect's request model produces its own `SamplingRequest` (what the client
sent; the gateway's defaults and caps come later, in `plan_sampling`)."""

from __future__ import annotations

from serve.protocol.openai import parse_chat_request, parse_completion_request
from serve.protocol.sampling import SamplingRequest
from serve.protocol.workers_ai import parse_run_input

MODEL = "@cf/qwen/qwen1.5-1.8b-chat"
SCHEMA = {"type": "object", "properties": {"a": {"type": "string"}}}
PENALTIES = {"repetition_penalty": 1.1, "frequency_penalty": 0.5, "presence_penalty": 0.25}


def test_workers_ai_input_asks_what_it_was_sent() -> None:
    run = parse_run_input(
        {
            "prompt": "hi",
            "max_tokens": 7,
            "temperature": 0.2,
            "top_p": 0.9,
            "top_k": 5,
            "seed": 42,
            "response_format": {"type": "json_schema", "json_schema": SCHEMA},
            **PENALTIES,
        }
    )
    assert run.sampling() == SamplingRequest(
        max_tokens=7, temperature=0.2, top_p=0.9, top_k=5, seed=42, json_schema=SCHEMA, **PENALTIES
    )
    # Nothing given: nothing asked (the configured defaults apply later).
    assert parse_run_input({"prompt": "hi"}).sampling() == SamplingRequest()


def test_openai_requests_ask_with_openai_defaults_and_names() -> None:
    chat = parse_chat_request(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "max_completion_tokens": 9,
            "top_k": -1,
            "stop": "END",
            "response_format": {"type": "json_object"},
            "seed": 1,
            **PENALTIES,
        }
    )
    assert chat.sampling() == SamplingRequest(
        max_tokens=9, temperature=1.0, stop=("END",), seed=1, json_object=True, **PENALTIES
    )
    completion = parse_completion_request(
        {"model": MODEL, "prompt": "hi", "temperature": 0, "top_k": 4, "stop": ["a", "b"]}
    )
    assert completion.sampling() == SamplingRequest(temperature=0, top_k=4, stop=("a", "b"))
