"""What `/openapi.json` documents: the real request bodies, the responses of each dialect
and the bearer scheme.

The routes read raw bodies and validate them themselves (`serve.protocol`), so FastAPI
cannot infer their schemas; they are attached here with `openapi_extra`. Documentation
only: nothing here takes part in validation. The Workers AI body is `INPUT_SCHEMA` as
is (the `oneOf` of prompt/messages); the OpenAI bodies are the JSON schemas of the
pydantic request models. Every operation documents its success response(s) and, as
`default`, the error envelope of its dialect, which is what any other status carries.
"""

from __future__ import annotations

import copy
from typing import Any, Final

from fastapi import FastAPI
from pydantic import BaseModel

from serve.protocol.openai import ChatCompletionRequest, CompletionRequest
from serve.protocol.workers_ai import INPUT_SCHEMA, OUTPUT_SCHEMA

Schema = dict[str, Any]

BEARER: Final = "bearer"
_OPENAI_PREFIX: Final = "OpenAI"
_REF: Final = "#/components/schemas/"
_JSON: Final = "application/json"
_SSE: Final = "text/event-stream"

_NOTE: Final[Schema] = {
    "type": "object",
    "required": ["code", "message"],
    "properties": {"code": {"type": "integer"}, "message": {"type": "string"}},
}
_COUNT: Final[Schema] = {"type": "integer", "minimum": 0}
_USAGE: Final[Schema] = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        "prompt_tokens": _COUNT,
        "completion_tokens": _COUNT,
        "total_tokens": _COUNT,
    },
}

WORKERS_AI_ERROR: Final[Schema] = {
    "title": "WorkersAiError",
    "description": "The Workers AI error envelope: `result` is null when the request was "
    "refused before inference, `{}` after.",
    "type": "object",
    "required": ["result", "success", "errors", "messages"],
    "additionalProperties": False,
    "properties": {
        "result": {"type": ["object", "null"], "maxProperties": 0},
        "success": {"const": False},
        "errors": {"type": "array", "minItems": 1, "items": _NOTE},
        "messages": {"type": "array", "items": _NOTE},
    },
}
OPENAI_ERROR: Final[Schema] = {
    "title": "OpenAIError",
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "additionalProperties": False,
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def _success(result: Schema) -> Schema:
    """The Workers AI success envelope around `result`."""
    return {
        "type": "object",
        "required": ["result", "success", "errors", "messages"],
        "properties": {
            "result": result,
            "success": {"const": True},
            "errors": {"type": "array", "maxItems": 0},
            "messages": {"type": "array", "items": _NOTE},
        },
    }


def _sse_event(payload: Schema) -> Schema:
    """One server-sent event: `data: [DONE]`, or `data: <JSON matching payload>`."""
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"const": "[DONE]"},
                    {"type": "string", "contentMediaType": _JSON, "contentSchema": payload},
                ]
            }
        },
    }


def _json_body(schema: Schema, description: str) -> Schema:
    # Documented as JSON; the gateway parses the body as JSON whatever its Content-Type.
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {_JSON: {"schema": schema}},
        },
        "security": [{BEARER: []}],
    }


def _responses(ok: Schema, error: Schema, *, stream: Schema | None = None) -> dict[int | str, Any]:
    content = {_JSON: {"schema": ok}}
    if stream is not None:
        content[_SSE] = {"schema": _sse_event(stream)}
    return {
        200: {"description": "Success", "content": content},
        "default": {"description": "Error", "content": {_JSON: {"schema": error}}},
    }


# -- Workers AI ---------------------------------------------------------------------


def _run_result() -> Schema:
    result = copy.deepcopy(OUTPUT_SCHEMA)
    result["required"] = ["response", "usage"]
    result["properties"]["usage"] = _USAGE
    return result


_RUN_STREAM_EVENT: Final[Schema] = {
    "type": "object",
    "required": ["response"],
    "properties": {
        "response": {"type": "string"},
        "usage": _USAGE,
        "finish_reason": {"type": "string", "enum": ["stop", "length"]},
        "p": {"type": "string", "description": "Random padding (stream_padding)."},
        "errors": {"type": "array", "items": _NOTE},
    },
}


def workers_ai_run() -> dict[str, Any]:
    """Keyword arguments of the `/ai/run/{model}` route."""
    return {
        "openapi_extra": _json_body(
            copy.deepcopy(INPUT_SCHEMA),
            "Exactly one of `prompt` / `messages` (the model's input schema); "
            "unknown keys are ignored.",
        ),
        "responses": _responses(
            _success(_run_result()), WORKERS_AI_ERROR, stream=_RUN_STREAM_EVENT
        ),
    }


def workers_ai_schema() -> dict[str, Any]:
    """Keyword arguments of the `/ai/models/schema` route."""
    result = {
        "type": "object",
        "required": ["input", "output"],
        "properties": {"input": {"type": "object"}, "output": {"type": "object"}},
    }
    model = {"name": "model", "in": "query", "required": True, "schema": {"type": "string"}}
    return {
        "openapi_extra": {"security": [{BEARER: []}], "parameters": [model]},
        "responses": _responses(_success(result), WORKERS_AI_ERROR),
    }


def workers_ai_usage() -> dict[str, Any]:
    """Keyword arguments of the `/ai/usage` route."""
    instant = {"type": "string", "description": "Epoch seconds or an ISO 8601 time (UTC)."}
    totals = {
        "type": "object",
        "required": ["model", "requests", "prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {
            "model": {"type": "string"},
            "requests": _COUNT,
            "prompt_tokens": _COUNT,
            "completion_tokens": _COUNT,
            "total_tokens": _COUNT,
        },
    }
    result = {
        "type": "object",
        "required": ["account_id", "since", "until", "models"],
        "properties": {
            "account_id": {"type": "string"},
            "since": {"type": "string"},
            "until": {"type": "string"},
            "models": {"type": "array", "items": totals},
        },
    }
    return {
        "openapi_extra": {
            "security": [{BEARER: []}],
            "parameters": [
                {"name": name, "in": "query", "required": False, "schema": instant}
                for name in ("since", "until")
            ],
        },
        "responses": _responses(_success(result), WORKERS_AI_ERROR),
    }


_TASK: Final[Schema] = {
    "type": "object",
    "required": ["id", "name", "description"],
    "properties": {
        "id": {"type": "string"},
        "name": {"type": "string"},
        "description": {"type": "string"},
    },
}
_CATALOG_MODEL: Final[Schema] = {
    "type": "object",
    "required": ["id", "source", "name", "description", "task", "tags", "properties"],
    "properties": {
        "id": {"type": "string"},
        "source": {"type": "number"},
        "name": {"type": "string"},
        "description": {"type": "string"},
        "task": _TASK,
        "tags": {"type": "array", "items": {"type": "string"}},
        "properties": {
            "type": "array",
            "description": "Hosted catalog properties, plus `context_window` (the served "
            "engine's) and `weights` (what really serves the name).",
            "items": {
                "type": "object",
                "required": ["property_id", "value"],
                "properties": {"property_id": {"type": "string"}, "value": {"type": "string"}},
            },
        },
    },
}


def _query(name: str, schema: Schema, description: str) -> Schema:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


def _listing(items: Schema, *, parameters: list[Schema] | None = None) -> dict[str, Any]:
    return {
        "openapi_extra": {"security": [{BEARER: []}], "parameters": parameters or []},
        "responses": _responses(_success({"type": "array", "items": items}), WORKERS_AI_ERROR),
    }


def workers_ai_model_search(max_per_page: int) -> dict[str, Any]:
    """Keyword arguments of the `/ai/models/search` route (paged: `result_info`)."""
    text = {"type": "string"}
    doc = _listing(
        _CATALOG_MODEL,
        parameters=[
            _query("author", text, "The author, e.g. `qwen` (`@cf/qwen/...`)."),
            _query("hide_experimental", {"type": "boolean"}, "Hide models marked experimental."),
            _query("include_deprecated", {"type": "boolean"}, "Accepted; none is deprecated."),
            _query("page", {"type": "integer", "minimum": 1}, "From 1 (default 1)."),
            _query(
                "per_page",
                {"type": "integer", "minimum": 1, "maximum": max_per_page},
                "Models a page (default 20).",
            ),
            _query("search", text, "A substring of the name or the description."),
            _query("source", {"type": "number"}, "The source id (1)."),
            _query("task", text, "The task name (e.g. `Text Generation`) or id."),
        ],
    )
    ok = doc["responses"][200]["content"][_JSON]["schema"]
    ok["required"] = [*ok["required"], "result_info"]
    ok["properties"]["result_info"] = {
        "type": "object",
        "required": ["page", "per_page", "count", "total_count"],
        "properties": {
            "page": {"type": "integer", "minimum": 1},
            "per_page": {"type": "integer", "minimum": 1},
            "count": _COUNT,
            "total_count": _COUNT,
        },
    }
    return doc


def workers_ai_task_search() -> dict[str, Any]:
    """Keyword arguments of the `/ai/tasks/search` route."""
    return _listing(_TASK)


def workers_ai_author_search() -> dict[str, Any]:
    """Keyword arguments of the `/ai/authors/search` route."""
    author = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
    return _listing(author)


# -- OpenAI ---------------------------------------------------------------------------


def _openai_request(model: type[BaseModel]) -> tuple[Schema, dict[str, Schema]]:
    """The request model's JSON schema and its definitions (components, prefixed)."""
    schema = model.model_json_schema(by_alias=True, ref_template=_REF + _OPENAI_PREFIX + "{model}")
    defs = {_OPENAI_PREFIX + name: d for name, d in schema.pop("$defs", {}).items()}
    return schema, defs


def openai_components() -> dict[str, Schema]:
    """Definitions the OpenAI request schemas refer to (`components/schemas`)."""
    out: dict[str, Schema] = {}
    for model in (ChatCompletionRequest, CompletionRequest):
        out.update(_openai_request(model)[1])
    return out


def _with_model(schema: Schema, model_name: str) -> Schema:
    """This deployment serves one model: any other name is answered 404 model_not_found."""
    schema["properties"]["model"].update(
        enum=[model_name], description="The served model (GET /v1/models)."
    )
    return schema


def _choice(chat: bool, *, chunk: bool) -> Schema:
    finish: Schema = {"enum": ["stop", "length", None] if chunk else ["stop", "length"]}
    body: Schema
    if chat and chunk:
        body = {"delta": {"type": "object"}}
    elif chat:
        body = {
            "message": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}},
            }
        }
    else:
        body = {"text": {"type": "string"}}
    return {
        "type": "object",
        "required": ["index", *body, "finish_reason"],
        "properties": {"index": _COUNT, **body, "finish_reason": finish},
    }


def _completion_object(chat: bool, *, chunk: bool) -> Schema:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    usage = {"anyOf": [_USAGE, {"type": "null"}]} if chunk else _USAGE
    required = ["id", "object", "created", "model", "choices"]
    return {
        "type": "object",
        "required": required if chunk else [*required, "usage"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": kind},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": _choice(chat, chunk=chunk)},
            "usage": usage,
        },
    }


def with_account(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` for a route under `/client/v4/accounts/{account_id}` whose handler does not
    declare `account_id` itself (it reads it from the request)."""
    out = copy.deepcopy(doc)
    account = {"name": "account_id", "in": "path", "required": True, "schema": {"type": "string"}}
    out["openapi_extra"]["parameters"] = [*out["openapi_extra"].get("parameters", []), account]
    return out


def openai_chat_completions(model_name: str) -> dict[str, Any]:
    return _openai_generation(ChatCompletionRequest, model_name, chat=True)


def openai_completions(model_name: str) -> dict[str, Any]:
    return _openai_generation(CompletionRequest, model_name, chat=False)


def _openai_generation(request: type[BaseModel], model_name: str, *, chat: bool) -> dict[str, Any]:
    schema, _ = _openai_request(request)
    what = (
        "A chat completion request."
        if chat
        else "A completion request: one prompt or a batch, as text or token ids."
    )
    return {
        "openapi_extra": _json_body(_with_model(schema, model_name), what),
        "responses": _responses(
            _completion_object(chat, chunk=False),
            OPENAI_ERROR,
            stream={"anyOf": [_completion_object(chat, chunk=True), OPENAI_ERROR]},
        ),
    }


_MODEL_OBJECT: Final[Schema] = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "model"},
        "created": {"type": "integer"},
        "owned_by": {"type": "string"},
        "weights": {"type": "string", "description": "The weights really serving this name."},
        "context_window": {"type": "integer"},
    },
}


def openai_models(*, one: bool) -> dict[str, Any]:
    listing = {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": _MODEL_OBJECT},
        },
    }
    return {
        "openapi_extra": {"security": [{BEARER: []}]},
        "responses": _responses(_MODEL_OBJECT if one else listing, OPENAI_ERROR),
    }


class GatewayAPI(FastAPI):
    """The gateway's FastAPI app: its OpenAPI document also carries the shared
    components (the bearer scheme and the OpenAI request definitions)."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            doc = super().openapi()
            components = doc.setdefault("components", {})
            components.setdefault("schemas", {}).update(openai_components())
            components["securitySchemes"] = {
                BEARER: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A tenant's API token.",
                }
            }
        return super().openapi()
