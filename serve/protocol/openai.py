"""The OpenAI dialect: request wire models (pydantic v2) and response objects (plain dicts).

Requests are validated strictly (no string-to-number coercion, booleans are not
numbers); unknown keys are ignored. Every failure is a `BadInput` whose `param`
names the offending field the way OpenAI does (`messages[0].content`).

Decided limits of this dialect:
- `prompt` (completions) takes OpenAI's four forms: a string, a list of strings (a
  batch), a list of token ids, or a list of token-id lists (a batch). A batch of k
  prompts with `n` choices each answers k*n choices, those of prompt p at indexes
  p*n .. p*n+n-1 (OpenAI's and vLLM's order). Empty prompts, empty lists and lists
  mixing strings with token ids are refused with a 400 naming `prompt`; token ids
  are checked against the model's vocabulary by the route (`check_token_ids`).
- `logprobs` / `top_logprobs` are refused with a 400 (not wired through the engine);
  `logprobs: false` / `null` and `top_logprobs: 0` are accepted.
- `logit_bias` is refused with a 400 unless empty (not wired through the engine; a
  token ban silently ignored would break what the caller asked for).
- vLLM's own sampling extensions `top_k` and `repetition_penalty` are honoured, as
  vLLM's OpenAI server honours them.
- `echo`, `suffix` and `best_of` > 1 (completions) are refused with a 400.
- This model does not call tools: `tools` are accepted and unused, so a `tool_choice`
  (or legacy `function_call`) that forces a call is refused with a 400; `auto` and
  `none` are served as plain text.
- `content` may be null (or absent) only on an assistant message; the text parts of
  an array `content` are joined with newlines, as vLLM joins them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, TypeVar, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import ErrorDetails

from serve.errors import BadInput
from serve.protocol.sampling import SamplingRequest, sampling_request
from serve.protocol.workers_ai import reject_if_busy
from serve.replica.engine import ChatMessage

MAX_STOP: Final = 4
DEFAULT_TEMPERATURE: Final = 1.0
"""OpenAI's documented default (the Workers AI route's default is the configured one)."""
_SEED_MIN: Final = -(2**63)
_SEED_MAX: Final = 2**63 - 1
# vLLM clamps top_k to the vocabulary, but the engine's msgpack wire carries no integer
# above 2**64 - 1: a larger one was an OverflowError there, a 500/3008 for a client's value.
_TOP_K_MAX: Final = 2**31 - 1
# pydantic names union members in error locations; they are not part of a field path.
_TYPE_TAGS: Final = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})

_Penalty = Annotated[float, Field(ge=-2, le=2)]
# How vLLM's OpenAI server joins the text parts of one message's `content` array.
TEXT_PART_SEPARATOR: Final = "\n"


class _Wire(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class ContentPart(_Wire):
    type: str
    text: str | None = None


class MessageIn(_Wire):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Wire):
    include_usage: bool = False


class JsonSchemaFormat(_Wire):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Wire):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _Common(_Wire):
    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    # Null is the default (`_null_is_the_default`), as the published schema says.
    n: Annotated[
        int,
        Field(ge=1),
        WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 1}, {"type": "null"}]}),
    ] = 1
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: Annotated[int, Field(ge=_SEED_MIN, le=_SEED_MAX)] | None = None
    presence_penalty: _Penalty | None = None
    frequency_penalty: _Penalty | None = None
    # vLLM's extensions: top_k -1 or 0 means no top-k; repetition_penalty must be > 0.
    top_k: Annotated[int, Field(ge=-1, le=_TOP_K_MAX)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: Annotated[bool, WithJsonSchema({"anyOf": [{"type": "boolean"}, {"type": "null"}]})] = (
        False
    )
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    # Cloudflare's request options (`reject_if_busy`), read as the run route reads them.
    options: Any = None

    @field_validator("n", "stream", mode="before")
    @classmethod
    def _null_is_the_default(cls, value: object, info: ValidationInfo) -> object:
        """OpenAI's reference documents both as "or null" (the default), and clients
        that send every unset field send them so."""
        if value is None and info.field_name is not None:
            return cls.model_fields[info.field_name].default
        return value

    @property
    def wanted_max_tokens(self) -> int | None:
        """`max_completion_tokens` is the newer name of `max_tokens`; it wins."""
        return self.max_completion_tokens or self.max_tokens

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def structured(self) -> tuple[dict[str, Any] | None, bool]:
        """(JSON schema, json_object) asked for by `response_format`."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None, False
        if fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise BadInput(
                    "response_format.json_schema is required when type is json_schema",
                    param="response_format.json_schema",
                )
            if fmt.json_schema.schema_ is not None:
                return fmt.json_schema.schema_, False
        return None, True

    def sampling(self) -> SamplingRequest:
        """What this request asks of the sampler (temperature: OpenAI's default if unset)."""
        return sampling_request(
            self,
            max_tokens=self.wanted_max_tokens,
            temperature=DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
            top_k=self.wanted_top_k,
            stop=self.stop_strings,
        )

    @property
    def reject_if_busy(self) -> bool:
        return reject_if_busy(self.options)

    @property
    def wanted_top_k(self) -> int | None:
        return self.top_k if self.top_k is not None and self.top_k > 0 else None

    def check_common(self) -> None:
        if self.logit_bias:
            raise BadInput("logit_bias is not supported", param="logit_bias")
        if "" in self.stop_strings:
            raise BadInput("stop strings must not be empty", param="stop")
        if self.stream_options is not None and not self.stream:
            # As OpenAI (and vLLM) answer it, rather than ignoring what was asked for.
            raise BadInput(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                param="stream_options",
            )


class ChatCompletionRequest(_Common):
    messages: Annotated[list[MessageIn], Field(min_length=1)]
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    # A named choice is an object ({"type": "function", "function": {"name": ...}}).
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    function_call: Literal["none", "auto"] | dict[str, Any] | None = None

    def chat_messages(self) -> list[ChatMessage]:
        """Messages for the chat template; `developer` is the newer name of `system`."""
        out = []
        for index, message in enumerate(self.messages):
            role = "system" if message.role == "developer" else message.role
            out.append(ChatMessage(role=role, content=_text_of(message.content, index)))
        return out

    def check(self) -> None:
        self.check_common()
        if self.logprobs:
            raise BadInput("logprobs are not supported", param="logprobs")
        if self.top_logprobs:
            raise BadInput("logprobs are not supported", param="top_logprobs")
        for name, choice in (
            ("tool_choice", self.tool_choice),
            ("function_call", self.function_call),
        ):
            if choice is not None and choice not in ("none", "auto"):
                raise BadInput(
                    f'{name}: this model does not call tools; only "auto" and "none" are supported',
                    param=name,
                )
        for index, message in enumerate(self.messages):
            if message.content is None and message.role != "assistant":
                raise BadInput(
                    f"messages[{index}].content: a {message.role} message needs content; "
                    "only an assistant message may leave it null",
                    param=f"messages[{index}].content",
                )


Prompt = str | list[int]
"""One prompt of a completion request: text, or token ids sent to the engine as they are."""

_PROMPT_DOC: Final = (
    "The prompt(s): a string, a list of strings (a batch), a list of token ids, or a "
    "list of token-id lists (a batch). A batch of k prompts answers k*n choices; those "
    "of prompt p have the indexes p*n to p*n+n-1. Token ids must be in [0, vocabulary "
    "size). No prompt, and no list, may be empty."
)


_TEXT: Final = {"type": "string", "minLength": 1}
_TOKEN_IDS: Final = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
# The four forms as documented (`/openapi.json`); validation is the model's and `check`'s.
_PROMPT_SCHEMA: Final = {
    "anyOf": [
        _TEXT,
        {"type": "array", "minItems": 1, "items": _TEXT},
        _TOKEN_IDS,
        {"type": "array", "minItems": 1, "items": _TOKEN_IDS},
    ],
    "description": _PROMPT_DOC,
}


class CompletionRequest(_Common):
    prompt: Annotated[str | list[str] | list[int] | list[list[int]], WithJsonSchema(_PROMPT_SCHEMA)]
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_kind_of_prompt(cls, value: object) -> object:
        """A list is all strings, all token ids or all token-id lists; said so plainly
        rather than as the first mismatch of the union."""
        if isinstance(value, list) and len({_prompt_kind(item) for item in value}) > 1:
            raise BadInput(
                "prompt: a list of prompts must hold only strings, only token ids "
                "(integers) or only lists of token ids, not a mix",
                param="prompt",
            )
        return value

    @property
    def prompts(self) -> list[Prompt]:
        """The prompts of this request, in order: one, or the batch."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        return list(cast(list[str] | list[list[int]], prompt))

    def check(self) -> None:
        self.check_common()
        if not self.prompt:
            raise BadInput("prompt must not be empty", param="prompt")
        for index, prompt in enumerate(self.prompts):
            if not prompt:  # an empty member of a batch
                raise BadInput(f"prompt[{index}] must not be empty", param="prompt")
        if self.logprobs is not None:
            raise BadInput("logprobs are not supported", param="logprobs")
        if self.echo:
            raise BadInput("echo is not supported", param="echo")
        if self.suffix:
            raise BadInput("suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of > 1:
            raise BadInput("best_of is not supported; use n", param="best_of")


def _prompt_kind(item: object) -> type:
    return int if isinstance(item, int) and not isinstance(item, bool) else type(item)


def check_token_ids(token_ids: Sequence[int], vocab_size: int) -> None:
    """A 400 naming `prompt` for an id outside [0, vocab_size), as vLLM refuses it."""
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise BadInput(
            f"prompt: token id {bad} is out of vocabulary (ids are 0 to {vocab_size - 1})",
            param="prompt",
        )


def _text_of(content: str | list[ContentPart] | None, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part_index, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise BadInput(
                f"content part type {part.type!r} is not supported; this model reads text only",
                param=f"messages[{index}].content[{part_index}]",
            )
        texts.append(part.text)
    return TEXT_PART_SEPARATOR.join(texts)


def _param_of(loc: Sequence[int | str]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.isidentifier() and part.islower() and part not in _TYPE_TAGS:
            path += f".{part}" if path else part
    return path


def _telling_error(errors: Sequence[ErrorDetails]) -> ErrorDetails:
    """The error to report: the first field's, and of a union (`stop: str | list[str]`)
    a member whose type matched rather than the first type mismatch (a list of five
    stop strings is too long, not "not a valid string")."""
    field = [e for e in errors if e["loc"][:1] == errors[0]["loc"][:1]]
    return next((e for e in field if not e["type"].endswith("_type")), errors[0])


def _message_of(error: ErrorDetails) -> str:
    """pydantic's message, but list lengths without its wording ("after validation")."""
    context = error.get("ctx") or {}
    bounds = {"too_long": ("at most", "max_length"), "too_short": ("at least", "min_length")}
    if error["type"] not in bounds:
        return error["msg"]
    words, key = bounds[error["type"]]
    limit = context[key]
    return f"{words} {limit} {'entry' if limit == 1 else 'entries'}, got {context['actual_length']}"


_Request = TypeVar("_Request", ChatCompletionRequest, CompletionRequest)


def _parse(kind: type[_Request], body: object) -> _Request:
    if not isinstance(body, dict):
        raise BadInput("the request body must be a JSON object")
    try:
        request = kind.model_validate(body)
    except ValidationError as exc:
        error = _telling_error(exc.errors())
        param = _param_of(error["loc"]) or None
        raise BadInput(f"{param or 'body'}: {_message_of(error)}", param=param) from None
    request.check()
    return request


def parse_chat_request(body: object) -> ChatCompletionRequest:
    return _parse(ChatCompletionRequest, body)


def parse_completion_request(body: object) -> CompletionRequest:
    return _parse(CompletionRequest, body)


# -- responses ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ResponseMeta:
    """What every object of one response shares."""

    id: str
    created: int
    model: str
    chat: bool

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def finish_reason(reason: str | None) -> str:
    """OpenAI knows `stop` and `length`; an engine abort is reported as `stop`."""
    return "length" if reason == "length" else "stop"


def completion_object(
    meta: ResponseMeta, choices: Sequence[tuple[str, str]], usage: Mapping[str, Any]
) -> dict[str, Any]:
    """`chat.completion` or `text_completion`; `choices` holds (text, finish_reason)."""
    out = []
    for index, (text, finish) in enumerate(choices):
        choice: dict[str, Any] = {"index": index}
        if meta.chat:
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
        else:
            choice["text"] = text
        choice.update(logprobs=None, finish_reason=finish)
        out.append(choice)
    return {**meta.head(meta.object), "choices": out, "usage": dict(usage)}


def chunk_object(
    meta: ResponseMeta,
    index: int,
    *,
    text: str = "",
    first: bool = False,
    finish: str | None = None,
    with_usage: bool = False,
) -> dict[str, Any]:
    """One streamed choice delta; a chat stream's first chunk carries the role."""
    choice: dict[str, Any] = {"index": index}
    if meta.chat:
        delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {}
        if text and not first:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text
    choice.update(logprobs=None, finish_reason=finish)
    chunk = {**meta.head(meta.chunk_object), "choices": [choice]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(meta: ResponseMeta, usage: Mapping[str, Any]) -> dict[str, Any]:
    """The last chunk when `stream_options.include_usage` is set: no choices, the totals."""
    return {**meta.head(meta.chunk_object), "choices": [], "usage": dict(usage)}
