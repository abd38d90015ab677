"""The Workers AI input schema, its validator and the body parsers."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, event, given, settings

from serve.errors import BadInput
from serve.protocol.workers_ai import (
    INPUT_SCHEMA,
    OUTPUT_SCHEMA,
    RunInput,
    parse_json_body,
    parse_run_input,
    published_schema,
    validate,
)
from serve.replica.engine import ChatMessage
from tests.schema_strategies import NEAR_BODIES, ORACLE, schema_bodies, subschemas

PROMPT: dict[str, Any] = {"prompt": "Hello"}
MESSAGES: dict[str, Any] = {"messages": [{"role": "user", "content": "Hello"}]}


def reason_of(body: object) -> str:
    with pytest.raises(BadInput) as caught:
        parse_run_input(body)
    assert caught.value.message == f"AiError: Bad input: {caught.value.reason}"
    return caught.value.reason


def accepted(body: object) -> bool:
    ok = not validate(body)
    assert ok == ORACLE.is_valid(body), body  # the oracle agrees on every hand-written case
    return ok


# -- the schema itself ------------------------------------------------------------------


def test_schema_is_valid_and_uses_only_keywords_the_validator_knows() -> None:
    jsonschema.Draft202012Validator.check_schema(INPUT_SCHEMA)
    jsonschema.Draft202012Validator.check_schema(OUTPUT_SCHEMA)
    known = {
        "type",
        "properties",
        "required",
        "items",
        "minItems",
        "minLength",
        "maxLength",
        "minimum",
        "maximum",
        "enum",
        "oneOf",
        "title",
        "description",
        "default",
    }
    for sub in subschemas(INPUT_SCHEMA):
        assert set(sub) <= known, set(sub) - known
        assert "additionalProperties" not in sub


def test_schema_shape() -> None:
    assert INPUT_SCHEMA["type"] == "object"
    prompt, messages = INPUT_SCHEMA["oneOf"]
    assert prompt["required"] == ["prompt"] and messages["required"] == ["messages"]
    assert {"raw", "lora"} <= set(prompt["properties"]) - set(messages["properties"])
    assert {"functions", "tools"} <= set(messages["properties"]) - set(prompt["properties"])
    for branch in (prompt, messages):
        props = branch["properties"]
        assert props["max_tokens"]["default"] == 256
        assert props["temperature"]["default"] == 0.6
        assert "response_format" in props
        assert all(p.get("description") for p in props.values())
    assert OUTPUT_SCHEMA["properties"]["finish_reason"]["enum"] == ["stop", "length"]
    published = published_schema()
    assert published == {"input": INPUT_SCHEMA, "output": OUTPUT_SCHEMA}
    published["input"]["oneOf"].clear()
    assert len(INPUT_SCHEMA["oneOf"]) == 2
    json.dumps(published_schema())


# -- ranges: the boundary is accepted, one past it rejected ------------------------------

RANGES = [
    ("temperature", 0, True),
    ("temperature", 5, True),
    ("temperature", -0.01, False),
    ("temperature", 5.01, False),
    ("top_k", 1, True),
    ("top_k", 50, True),
    ("top_k", 0, False),
    ("top_k", 51, False),
    ("seed", 1, True),
    ("seed", 9999999999, True),
    ("seed", 0, False),
    ("seed", 10000000000, False),
    ("top_p", 0, True),
    ("top_p", 2, True),
    ("top_p", -0.01, False),
    ("top_p", 2.01, False),
]
RANGES += [
    (name, value, ok)
    for name in ("repetition_penalty", "frequency_penalty", "presence_penalty")
    for value, ok in ((0, True), (2, True), (-0.01, False), (2.01, False))
]


@pytest.mark.parametrize("base", [PROMPT, MESSAGES], ids=["prompt", "messages"])
@pytest.mark.parametrize(("field", "value", "ok"), RANGES)
def test_ranges(base: dict[str, Any], field: str, value: float, ok: bool) -> None:
    body = {**base, field: value}
    assert accepted(body) is ok
    if ok:
        assert getattr(parse_run_input(body), field) == value
    else:
        bound = ">= " if value < 1 else "<= "
        assert reason_of(body).startswith(f"'/{field}' must be {bound}")


@pytest.mark.parametrize("base", [PROMPT, MESSAGES], ids=["prompt", "messages"])
@pytest.mark.parametrize("value", [0, -1, -256])
def test_max_tokens_must_be_positive(base: dict[str, Any], value: int) -> None:
    # Cloudflare's schema sets no minimum; 0 and below used to be served as 1 in silence.
    assert reason_of({**base, "max_tokens": value}) == "'/max_tokens' must be >= 1"
    assert parse_run_input({**base, "max_tokens": 1}).max_tokens == 1


def test_exact_range_messages() -> None:
    assert reason_of({**PROMPT, "top_k": 51}) == "'/top_k' must be <= 50"
    assert reason_of({**PROMPT, "temperature": -1}) == "'/temperature' must be >= 0"
    assert reason_of({**MESSAGES, "seed": 10**10}) == "'/seed' must be <= 9999999999"
    with pytest.raises(BadInput) as caught:
        parse_run_input({**PROMPT, "top_p": 3, "top_k": 0})
    assert caught.value.reason == "'/top_p' must be <= 2, '/top_k' must be >= 1"
    assert caught.value.param == "/top_p"


@pytest.mark.parametrize(("length", "ok"), [(1, True), (131072, True), (0, False), (131073, False)])
@pytest.mark.parametrize("char", ["a", "\U0001f600"])  # code points, not UTF-16 units/bytes
def test_prompt_length(length: int, ok: bool, char: str) -> None:
    body = {"prompt": char * length}
    assert accepted(body) is ok
    if ok:
        assert parse_run_input(body).prompt == char * length
    elif length == 0:
        assert reason_of(body) == "'/prompt' must NOT have fewer than 1 characters"
    else:
        assert reason_of(body) == "'/prompt' must NOT have more than 131072 characters"


@pytest.mark.parametrize(("length", "ok"), [(0, True), (131072, True), (131073, False)])
def test_content_length(length: int, ok: bool) -> None:
    body = {"messages": [{"role": "user", "content": "\u00e9" * length}]}
    assert accepted(body) is ok
    if not ok:
        assert reason_of(body) == (
            "'/messages/0/content' must NOT have more than 131072 characters"
        )


# -- the oneOf and the messages ------------------------------------------------------------


def test_neither_prompt_nor_messages() -> None:
    for body in ({}, {"temperature": 0.5}, {"promt": "typo"}):
        with pytest.raises(BadInput) as caught:
            parse_run_input(body)
        assert caught.value.reason == (
            "oneOf at '/' not met, 0 matches: required properties at '/' are 'prompt' or 'messages'"
        )
        assert caught.value.param is None


def test_prompt_and_messages_are_mutually_exclusive() -> None:
    assert reason_of({**PROMPT, **MESSAGES}) == (
        "oneOf at '/' not met, 2 matches: 'prompt' and 'messages' are mutually exclusive"
    )
    reason = reason_of({"prompt": "", "messages": [{"role": "user"}]})
    assert "'prompt' and 'messages' are mutually exclusive" in reason


def test_reasons_name_only_the_branch_aimed_at() -> None:
    assert reason_of({**PROMPT, "top_k": 100, "functions": 3}) == "'/top_k' must be <= 50"
    assert reason_of({**MESSAGES, "top_k": 100, "raw": 3}) == "'/top_k' must be <= 50"
    assert reason_of({"prompt": 7}) == "Type mismatch of '/prompt', 'integer' not in 'string'"
    assert reason_of({"messages": {}}) == "Type mismatch of '/messages', 'object' not in 'array'"


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (None, "null"),
        ([], "array"),
        ([{"type": "text", "text": "hi"}], "array"),
        (3, "integer"),
        ({}, "object"),
    ],
)
def test_content_must_be_a_string(content: object, kind: str) -> None:
    body = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": content}]}
    with pytest.raises(BadInput) as caught:
        parse_run_input(body)
    assert caught.value.reason == (
        f"Type mismatch of '/messages/1/content', '{kind}' not in 'string'"
    )
    assert caught.value.param == "/messages/1/content"


def test_messages_need_role_and_content() -> None:
    messages = [{"role": "user", "content": "x"}] * 17 + [{"content": "x"}]
    assert reason_of({"messages": messages}) == (
        "required properties at '/messages/17' are 'role,content'"
    )
    assert reason_of({"messages": ["hi"]}) == (
        "Type mismatch of '/messages/0', 'string' not in 'object'"
    )


def test_messages_must_not_be_empty() -> None:
    # An empty conversation used to reach the chat template and fail there (a 500).
    assert not accepted({"messages": [], "max_tokens": 2})
    with pytest.raises(BadInput) as caught:
        parse_run_input({"messages": []})
    assert caught.value.reason == "'/messages' must NOT have fewer than 1 items"
    assert caught.value.param == "/messages"


def test_functions_items_need_name_and_code() -> None:
    assert accepted({**MESSAGES, "functions": [{"name": "f", "code": "return 1"}]})
    assert reason_of({**MESSAGES, "functions": [{"name": "f"}]}) == (
        "required properties at '/functions/0' are 'name,code'"
    )
    assert reason_of({**MESSAGES, "functions": [{"code": "x"}]}) == (
        "required properties at '/functions/0' are 'name,code'"
    )
    assert reason_of({**MESSAGES, "functions": {}}) == (
        "Type mismatch of '/functions', 'object' not in 'array,null'"
    )
    assert not accepted({**MESSAGES, "tools": ["not an object"]})


def test_unknown_keys_and_client_nulls_are_ignored() -> None:
    assert accepted({**PROMPT, "stop": None, "tools": None, "functions": None, "x": {"y": [1]}})
    assert accepted({**MESSAGES, "stop": None, "tools": None, "functions": None, "n": 2})
    assert accepted({**MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]})
    assert parse_run_input({**PROMPT, "stop": None, "extra": 1}) == parse_run_input(PROMPT)


def test_response_format_extension() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    body = {**PROMPT, "response_format": {"type": "json_schema", "json_schema": schema}}
    assert parse_run_input(body).response_format == body["response_format"]
    assert parse_run_input({**MESSAGES, "response_format": {"type": "json_object"}})
    assert reason_of({**PROMPT, "response_format": {"type": "xml"}}) == (
        "'/response_format/type' must be one of 'json_object', 'json_schema'"
    )
    assert not accepted({**PROMPT, "response_format": {}})
    assert not accepted({**PROMPT, "response_format": "json"})


# -- types ---------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["max_tokens", "top_k", "seed", "temperature", "top_p"])
@pytest.mark.parametrize("value", [True, False])
def test_booleans_are_not_numbers(field: str, value: bool) -> None:
    reason = reason_of({**PROMPT, field: value})
    assert reason.startswith(f"Type mismatch of '/{field}', 'boolean' not in ")


@pytest.mark.parametrize("field", ["max_tokens", "top_k", "seed"])
def test_integers(field: str) -> None:
    assert reason_of({**PROMPT, field: 2.5}) == (
        f"Type mismatch of '/{field}', 'number' not in 'integer'"
    )
    assert reason_of({**PROMPT, field: "5"}) == (
        f"Type mismatch of '/{field}', 'string' not in 'integer'"
    )
    value = getattr(parse_run_input({**PROMPT, field: 5.0}), field)  # JSON Schema: 5.0 is integral
    assert value == 5 and type(value) is int


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_are_rejected(value: float) -> None:
    assert reason_of({**PROMPT, "temperature": value}).startswith(
        "Type mismatch of '/temperature', "
    )


def test_flags_and_strings() -> None:
    assert reason_of({**PROMPT, "raw": "true"}) == (
        "Type mismatch of '/raw', 'string' not in 'boolean'"
    )
    assert reason_of({**PROMPT, "stream": 1}) == (
        "Type mismatch of '/stream', 'integer' not in 'boolean'"
    )
    assert reason_of({**PROMPT, "lora": None}) == "Type mismatch of '/lora', 'null' not in 'string'"
    assert reason_of({**PROMPT, "temperature": None}) == (
        "Type mismatch of '/temperature', 'null' not in 'number'"
    )


@pytest.mark.parametrize(
    ("body", "kind"),
    [([], "array"), ("hi", "string"), (None, "null"), (3, "integer"), (True, "boolean")],
)
def test_body_must_be_an_object(body: object, kind: str) -> None:
    assert reason_of(body) == f"Type mismatch of '/', '{kind}' not in 'object'"


# -- conversion ----------------------------------------------------------------------------


def test_parse_prompt_input() -> None:
    body = {
        "prompt": "Hi",
        "raw": True,
        "lora": "x",
        "stream": True,
        "max_tokens": 10,
        "temperature": 1,
        "top_p": 0.5,
        "top_k": 3,
        "seed": 7,
        "repetition_penalty": 1.1,
        "frequency_penalty": 0.2,
        "presence_penalty": 0.3,
    }
    assert parse_run_input(body) == RunInput(
        prompt="Hi",
        messages=None,
        raw=True,
        lora="x",
        stream=True,
        max_tokens=10,
        temperature=1.0,
        top_p=0.5,
        top_k=3,
        seed=7,
        repetition_penalty=1.1,
        frequency_penalty=0.2,
        presence_penalty=0.3,
        response_format=None,
    )
    assert type(parse_run_input(body).temperature) is float


def test_parse_messages_input_and_defaults() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi", "name": "bob"},
        ],
        "raw": "ignored: not a property of the Messages branch",
    }
    assert parse_run_input(body) == RunInput(
        prompt=None,
        messages=(ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")),
        raw=False,
        lora=None,
        stream=False,
        max_tokens=None,
        temperature=None,
        top_p=None,
        top_k=None,
        seed=None,
        repetition_penalty=None,
        frequency_penalty=None,
        presence_penalty=None,
        response_format=None,
    )


# -- parse_json_body -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "Invalid JSON: empty body"),
        (b" \r\n\t", "Invalid JSON: empty body"),
        (b"prompt=hi", "Invalid JSON: Expecting value at line 1 column 1"),
        (b'{"prompt": }', "Invalid JSON: Expecting value at line 1 column 12"),
        (
            b'{\n "prompt": "hi"\n "x": 1}',
            "Invalid JSON: Expecting ',' delimiter at line 3 column 2",
        ),
        (b'{"prompt": "hi"} x', "Invalid JSON: Extra data at line 1 column 18"),
        (b'{"prompt": "\xff"}', "Invalid JSON: body is not valid UTF-8 (byte 0xff at offset 12)"),
        (b'{"temperature": NaN}', "Invalid JSON: NaN is not a valid JSON value"),
        (b'{"temperature": Infinity}', "Invalid JSON: Infinity is not a valid JSON value"),
        (b'{"temperature": -Infinity}', "Invalid JSON: -Infinity is not a valid JSON value"),
        (b'{"temperature": 1e999}', "Invalid JSON: number 1e999 is out of range"),
        (
            b'{"prompt": "\\ud800"}',
            "Invalid JSON: a string holds an unpaired surrogate escape (\\ud800-\\udfff)",
        ),
        (b'{"seed": ' + b"9" * 5000 + b"}", "Invalid JSON: an integer literal has too many digits"),
    ],
)
def test_parse_json_body_rejects(raw: bytes, reason: str) -> None:
    with pytest.raises(BadInput) as caught:
        parse_json_body(raw)
    assert caught.value.reason == reason


@pytest.mark.parametrize("depth", [200, 100_000])
def test_parse_json_body_deep_nesting_is_bad_input(depth: int) -> None:
    for raw in (b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth):
        with pytest.raises(BadInput, match="nested deeper than"):
            parse_json_body(raw)


def test_parse_json_body_accepts() -> None:
    raw = b'{"prompt": "h\\u00e9 \\ud83d\\ude00"}'
    assert parse_json_body(raw) == {"prompt": "h\u00e9 \U0001f600"}
    assert parse_json_body('\ufeff{"a": 1}'.encode()) == {"a": 1}
    assert parse_json_body(b"[" * 100 + b"]" * 100) is not None
    assert parse_json_body(b"3") == 3


# -- property tests ----------------------------------------------------------------------


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema_bodies())
def test_generated_valid_inputs_are_accepted(body: dict[str, Any]) -> None:
    run = parse_run_input(body)
    assert (run.prompt is None) != (run.messages is None)
    if run.messages is not None:
        assert len(run.messages) == len(body["messages"])


@settings(max_examples=500, deadline=None)
@given(NEAR_BODIES)
def test_validator_agrees_with_jsonschema(body: Any) -> None:
    ours = validate(body)
    assert (not ours) == ORACLE.is_valid(body), (body, ours)
    if ours:
        event("rejected")
        with pytest.raises(BadInput):
            parse_run_input(body)
    else:
        event("accepted")
        parse_run_input(body)
