"""The Workers AI dialect of `@cf/qwen/qwen1.5-1.8b-chat`: input schema, validator, parsing.

`INPUT_SCHEMA` is the single source of truth. The small validator below interprets it
(keywords: type, properties, required, items, minItems, minLength, maxLength, minimum,
maximum, enum, oneOf; the annotations title/description/default are ignored) and reports
reasons in Cloudflare's wording. Semantics are those of JSON Schema 2020-12:

- booleans are never integers or numbers;
- "integer" is a Python int or a finite float with an integral value (`5.0`), which
  `parse_run_input` converts with `int()`;
- NaN and +-Infinity are never numbers (`parse_json_body` never produces them);
- string lengths count Unicode code points;
- `oneOf` is standard, so `{"prompt": "hi", "messages": 3}` matches only the Prompt
  branch (there `messages` is an unknown key) and is accepted as a prompt request.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Final

from serve.errors import BadInput
from serve.protocol.sampling import SamplingRequest, sampling_request
from serve.replica.engine import ChatMessage

TEXT_MAX_CHARS: Final = 131072
MAX_JSON_DEPTH: Final = 128


def _p(kind: str | list[str], description: str, **keywords: Any) -> dict[str, Any]:
    """One property: its type, a description and any further keywords."""
    return {"type": kind, "description": description, **keywords}


def _obj(description: str, properties: dict[str, Any], *required: str) -> dict[str, Any]:
    return _p("object", description, properties=properties, required=list(required))


_RESPONSE_FORMAT: Final = _obj(
    "batchserve extension (not in Cloudflare's schema for this model): constrain the "
    "output to JSON, optionally to the given JSON schema.",
    {
        "type": _p("string", "json_object or json_schema.", enum=["json_object", "json_schema"]),
        "json_schema": _p("object", "The JSON schema to follow (type json_schema)."),
    },
    "type",
)
_SAMPLING: Final[dict[str, Any]] = {
    "stream": _p("boolean", "Stream the response as server-sent events.", default=False),
    # Cloudflare's schema sets no minimum; a request for no tokens at all is refused
    # (as OpenAI does) rather than quietly served as 1.
    "max_tokens": _p(
        "integer", "The maximum number of tokens to generate.", minimum=1, default=256
    ),
    "temperature": _p(
        "number", "Randomness of sampling; 0 is greedy.", minimum=0, maximum=5, default=0.6
    ),
    "top_p": _p(
        "number",
        "Nucleus sampling: keep the smallest set of likeliest tokens "
        "whose probabilities add up to top_p.",
        minimum=0,
        maximum=2,
    ),
    "top_k": _p("integer", "Sample only from the k likeliest tokens.", minimum=1, maximum=50),
    "seed": _p("integer", "Random seed for reproducible sampling.", minimum=1, maximum=9999999999),
    "repetition_penalty": _p(
        "number",
        "Penalty for tokens already in the prompt or the output (1 is none).",
        minimum=0,
        maximum=2,
    ),
    "frequency_penalty": _p(
        "number",
        "Penalty growing with how often a token already appeared in the output.",
        minimum=0,
        maximum=2,
    ),
    "presence_penalty": _p(
        "number", "Penalty for any token that already appeared in the output.", minimum=0, maximum=2
    ),
    "response_format": _RESPONSE_FORMAT,
}
_PROMPT_BRANCH: Final[dict[str, Any]] = {
    "title": "Prompt",
    "properties": {
        "prompt": _p(
            "string",
            "The input text to generate a response for.",
            minLength=1,
            maxLength=TEXT_MAX_CHARS,
        ),
        "raw": _p(
            "boolean",
            "Send the prompt to the model verbatim, without the chat template.",
            default=False,
        ),
        **_SAMPLING,
        "lora": _p("string", "Name of a LoRA adapter (this model has none)."),
    },
    "required": ["prompt"],
}
_MESSAGES_BRANCH: Final[dict[str, Any]] = {
    "title": "Messages",
    "properties": {
        "messages": _p(
            "array",
            "The conversation so far, oldest first (at least one message).",
            minItems=1,
            items=_obj(
                "One message.",
                {
                    "role": _p("string", "Who wrote it: system, user, assistant or tool."),
                    "content": _p("string", "Its text.", maxLength=TEXT_MAX_CHARS),
                },
                "role",
                "content",
            ),
        ),
        "functions": _p(
            ["array", "null"],
            "Functions the model may call (accepted, unused).",
            items=_obj(
                "One function.",
                {
                    "name": _p("string", "The function's name."),
                    "code": _p("string", "The function's code."),
                },
                "name",
                "code",
            ),
        ),
        "tools": _p(
            ["array", "null"],
            "Tools the model may call (accepted, unused): each "
            "{name, description, parameters} or {type, function}.",
            items={"type": "object"},
        ),
        **_SAMPLING,
    },
    "required": ["messages"],
}
INPUT_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "oneOf": [_PROMPT_BRANCH, _MESSAGES_BRANCH],
}

_COUNT: Final = {"type": "integer", "default": 0}
OUTPUT_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "properties": {
        "response": _p("string", "The generated text."),
        "usage": _p(
            "object",
            "Token counts.",
            properties={
                "prompt_tokens": _COUNT,
                "completion_tokens": _COUNT,
                "total_tokens": _COUNT,
            },
        ),
        "finish_reason": _p(
            "string",
            "batchserve extension (additive): why generation ended; "
            "length means max_tokens was reached.",
            enum=["stop", "length"],
        ),
    },
}


def published_schema() -> dict[str, Any]:
    """The schema as served to clients (a copy: callers may not alter the source of truth)."""
    return copy.deepcopy({"input": INPUT_SCHEMA, "output": OUTPUT_SCHEMA})


# -- the validator ---------------------------------------------------------------------

Failure = tuple[str, str]
"""(JSON pointer of the failing value, human reason)."""


def _pointer(path: Sequence[str | int]) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path) or "/"


_TYPE_NAMES: Final = (
    (bool, "boolean"),
    (int, "integer"),
    (float, "number"),
    (str, "string"),
    (list, "array"),
    (dict, "object"),
    (type(None), "null"),
)


def _type_of(value: object) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity"
    return next(
        (name for kind, name in _TYPE_NAMES if isinstance(value, kind)), type(value).__name__
    )


def _is_type(value: object, name: str) -> bool:
    actual = _type_of(value)
    if name == "number":
        return actual in ("integer", "number")
    if name == "integer":
        return actual == "integer" or (
            isinstance(value, float) and actual == "number" and value.is_integer()
        )
    return actual == name


def _same(a: object, b: object) -> bool:
    return (isinstance(a, bool) == isinstance(b, bool)) and a == b


def _fmt(limit: object) -> str:
    return str(int(limit)) if isinstance(limit, float) and limit.is_integer() else str(limit)


def _label(branch: Mapping[str, Any]) -> str:
    required = branch.get("required")
    return "'" + ",".join(required) + "'" if required else f"'{branch.get('title', '?')}'"


def schema_failures(
    value: object, schema: Mapping[str, Any] = INPUT_SCHEMA, path: tuple[str | int, ...] = ()
) -> list[Failure]:
    """Every reason why `value` does not match `schema`; empty when it matches."""
    here = _pointer(path)
    types = schema.get("type")
    if types is not None:
        allowed = [types] if isinstance(types, str) else list(types)
        if not any(_is_type(value, t) for t in allowed):
            reason = f"Type mismatch of '{here}', '{_type_of(value)}' not in '{','.join(allowed)}'"
            return [(here, reason)]
    out: list[Failure] = []
    if "enum" in schema and not any(_same(value, e) for e in schema["enum"]):
        options = ", ".join(f"'{e}'" for e in schema["enum"])
        out.append((here, f"'{here}' must be one of {options}"))
    if isinstance(value, str):
        shortest, longest = schema.get("minLength", 0), schema.get("maxLength", math.inf)
        if len(value) < shortest:
            out.append((here, f"'{here}' must NOT have fewer than {shortest} characters"))
        if len(value) > longest:
            out.append((here, f"'{here}' must NOT have more than {longest} characters"))
    if _is_type(value, "number") and isinstance(value, int | float):
        low, high = schema.get("minimum", -math.inf), schema.get("maximum", math.inf)
        if value < low:
            out.append((here, f"'{here}' must be >= {_fmt(low)}"))
        if value > high:
            out.append((here, f"'{here}' must be <= {_fmt(high)}"))
    if isinstance(value, list) and len(value) < schema.get("minItems", 0):
        out.append((here, f"'{here}' must NOT have fewer than {schema['minItems']} items"))
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            out += schema_failures(item, schema["items"], (*path, index))
    if isinstance(value, dict):
        required = schema.get("required", [])
        if any(key not in value for key in required):
            out.append((here, f"required properties at '{here}' are '{','.join(required)}'"))
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                out += schema_failures(value[key], sub, (*path, key))
    if "oneOf" in schema:
        out += _one_of(value, schema["oneOf"], path)
    return out


def _one_of(
    value: object, branches: Sequence[Mapping[str, Any]], path: tuple[str | int, ...]
) -> list[Failure]:
    """Standard oneOf, but the reasons name only the branch the body was aiming at."""
    here = _pointer(path)
    results = [schema_failures(value, branch, path) for branch in branches]
    matched = [branch for branch, failures in zip(branches, results, strict=True) if not failures]
    if len(matched) == 1:
        return []
    prefix = f"oneOf at '{here}' not met, {len(matched)} matches: "
    exclusive = " and ".join(_label(b) for b in matched) + " are mutually exclusive"
    if matched:
        return [(here, prefix + exclusive)]
    aimed = [
        (branch, failures)
        for branch, failures in zip(branches, results, strict=True)
        if isinstance(value, dict)
        and branch.get("required")
        and all(key in value for key in branch["required"])
    ]
    if len(aimed) == 1:  # e.g. only `prompt` given: only the Prompt branch's reasons matter
        return aimed[0][1]
    if not aimed:
        wanted = " or ".join(_label(b) for b in branches)
        return [(here, f"{prefix}required properties at '{here}' are {wanted}")]
    exclusive = " and ".join(_label(b) for b, _ in aimed) + " are mutually exclusive"
    return [(here, prefix + exclusive)] + [f for _, failures in aimed for f in failures]


def validate(value: object, schema: Mapping[str, Any] = INPUT_SCHEMA) -> list[str]:
    """The human reasons why `value` does not match `schema` (empty when it does)."""
    return [reason for _, reason in schema_failures(value, schema)]


# -- parsing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunInput:
    """A validated `/ai/run` body. None means "not given": the caller applies defaults."""

    prompt: str | None
    messages: tuple[ChatMessage, ...] | None
    raw: bool
    lora: str | None
    stream: bool
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    repetition_penalty: float | None
    frequency_penalty: float | None
    presence_penalty: float | None
    response_format: dict[str, Any] | None
    # `options.rejectIfBusy` (a request option beside the model's input, not in its
    # schema): refuse with 429/3040 at once rather than wait for a free slot.
    reject_if_busy: bool = False

    def structured(self) -> tuple[dict[str, Any] | None, bool]:
        """(JSON schema, json_object) asked for by `response_format` (extension). The
        schema is given as is, or wrapped OpenAI-style as `{"name": ..., "schema": {...}}`."""
        fmt = self.response_format
        if fmt is None:
            return None, False
        schema = fmt.get("json_schema")
        if isinstance(schema, dict) and isinstance(schema.get("schema"), dict):
            schema = schema["schema"]
        if fmt["type"] == "json_schema" and isinstance(schema, dict):
            return schema, False
        return None, True

    def sampling(self) -> SamplingRequest:
        """What this input asks of the sampler (None: the gateway's default applies)."""
        return sampling_request(
            self, max_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k
        )


_CASTS: Final[dict[str, Callable[[Any], Any]]] = {
    "integer": int,
    "number": float,
    "boolean": bool,
    "object": dict,
}


def parse_run_input(body: object) -> RunInput:
    """Validate `body` against INPUT_SCHEMA and convert it; unknown keys are ignored.

    Only the properties of the branch that matched are read (`raw` beside `messages` is an
    unknown key, as in the schema); integral floats become ints, numbers become floats.
    """
    failures = schema_failures(body)
    if failures or not isinstance(body, dict):
        first = failures[0][0] if failures else "/"
        reason = ", ".join(r for _, r in failures) or "body must be an object"
        raise BadInput(reason, param=None if first == "/" else first)
    is_prompt = not schema_failures(body, _PROMPT_BRANCH)
    known = (_PROMPT_BRANCH if is_prompt else _MESSAGES_BRANCH)["properties"]
    values: dict[str, Any] = {f.name: None for f in fields(RunInput)}
    values.update(raw=False, stream=False, reject_if_busy=reject_if_busy(body.get("options")))
    for name in values:
        if name in known and body.get(name) is not None:
            values[name] = _CASTS.get(known[name]["type"], lambda v: v)(body[name])
    if not is_prompt:
        values["messages"] = tuple(
            ChatMessage(role=m["role"], content=m["content"]) for m in body["messages"]
        )
    return RunInput(**values)


def reject_if_busy(options: object) -> bool:
    """Cloudflare's request option `options.rejectIfBusy` (beside the input, on the run
    route and its OpenAI-compatible one): true refuses at once rather than wait for a slot.
    Anything but an object holding `true` is no option, as other unknown input is ignored."""
    return isinstance(options, dict) and options.get("rejectIfBusy") is True


class _NotJson(ValueError):
    """A JSON text Python would accept but JSON does not (NaN, 1e400)."""


def _reject_constant(literal: str) -> object:
    raise _NotJson(f"{literal} is not a valid JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJson(f"number {text} is out of range")
    return value


def _check_tree(value: object) -> None:
    """Reject nesting deeper than MAX_JSON_DEPTH and strings that are not valid Unicode."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (list, dict)):
            if depth > MAX_JSON_DEPTH:
                raise BadInput(f"Invalid JSON: nested deeper than {MAX_JSON_DEPTH} levels")
            stack.extend((child, depth + 1) for child in node)
            if isinstance(node, dict):
                stack.extend((child, depth + 1) for child in node.values())
        elif isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                raise BadInput(
                    "Invalid JSON: a string holds an unpaired surrogate escape (\\ud800-\\udfff)"
                ) from None


def parse_json_body(raw: bytes) -> object:
    """Parse a request body as JSON, whatever its declared content type."""
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise BadInput(
            f"Invalid JSON: body is not valid UTF-8 (byte 0x{raw[exc.start]:02x} "
            f"at offset {exc.start})"
        ) from None
    if not text.strip(" \t\r\n"):
        raise BadInput("Invalid JSON: empty body")
    try:
        value: object = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise BadInput(f"Invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise BadInput(f"Invalid JSON: nested deeper than {MAX_JSON_DEPTH} levels") from None
    except _NotJson as exc:
        raise BadInput(f"Invalid JSON: {exc}") from None
    except ValueError:  # Python refuses to convert integer literals over 4300 digits
        raise BadInput("Invalid JSON: an integer literal has too many digits") from None
    _check_tree(value)
    return value
