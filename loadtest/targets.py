"""Targets: how one request is written for a dialect and how its answer is read.

Workers AI run route (`response`/`usage`/`[DONE]`, non-streaming in the v4 envelope) and the
OpenAI chat/completions routes. Parsing here runs after the request, never on the hot path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Dialect(StrEnum):
    WORKERS_AI = "workers-ai"
    OPENAI_CHAT = "openai-chat"
    OPENAI_COMPLETIONS = "openai-completions"


@dataclass(frozen=True, slots=True)
class Turn:
    """What one request asks: chat messages (or a raw prompt) and the wanted output length."""

    messages: tuple[tuple[str, str], ...] | None
    prompt: str | None
    max_tokens: int


@dataclass(frozen=True, slots=True)
class HttpRequest:
    url: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class Piece:
    """What one SSE event (or a whole non-streamed body) carried."""

    content: str = ""
    reasoning: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    done: bool = False

    @property
    def content_bearing(self) -> bool:
        return bool(self.content or self.reasoning)


@dataclass(frozen=True)
class Target:
    base_url: str
    dialect: Dialect
    model: str
    token: str | None = None
    account: str = "dev-account"
    stream: bool = True
    force_output: bool = False
    """Send `ignore_eos` and `min_tokens` so the output has exactly `max_tokens` tokens.
    Only servers that accept them (vLLM's OpenAI server) honour them; the realised length
    is reported against the requested one either way."""
    extra_body: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        base = self.base_url.rstrip("/")
        if self.dialect is Dialect.WORKERS_AI:
            return f"{base}/client/v4/accounts/{self.account}/ai/run/{self.model}"
        if self.dialect is Dialect.OPENAI_CHAT:
            return f"{base}/v1/chat/completions"
        return f"{base}/v1/completions"

    def request(self, turn: Turn) -> HttpRequest:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        body: dict[str, Any] = {"max_tokens": turn.max_tokens, "stream": self.stream}
        messages = [{"role": r, "content": c} for r, c in turn.messages or ()]
        if self.dialect is Dialect.WORKERS_AI:
            if turn.messages is not None:
                body["messages"] = messages
            else:
                body.update(prompt=turn.prompt or "", raw=True)
        else:
            body["model"] = self.model
            if self.stream:
                body["stream_options"] = {"include_usage": True}
            if self.dialect is Dialect.OPENAI_CHAT:
                body["messages"] = messages or [{"role": "user", "content": turn.prompt or ""}]
            else:
                body["prompt"] = turn.prompt if turn.prompt is not None else _flatten(messages)
        if self.force_output:
            body.update(ignore_eos=True, min_tokens=turn.max_tokens)
        body.update(self.extra_body)
        return HttpRequest(self.url, headers, json.dumps(body).encode())

    def parse_event(self, data: str) -> Piece:
        if data.strip() == "[DONE]":
            return Piece(done=True)
        try:
            obj = json.loads(data)
        except json.JSONDecodeError:
            return Piece(error=f"undecodable event: {data[:80]!r}")
        if not isinstance(obj, dict):
            return Piece(error="event is not an object")
        if self.dialect is Dialect.WORKERS_AI:
            return _workers_ai_piece(obj)
        return _openai_piece(obj)

    def parse_body(self, body: bytes) -> Piece:
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            return Piece(error=f"undecodable body: {body[:80]!r}")
        if not isinstance(obj, dict):
            return Piece(error="body is not an object")
        if self.dialect is Dialect.WORKERS_AI:
            result = obj.get("result")
            if not obj.get("success", True) or not isinstance(result, dict):
                return Piece(error=_error_text(obj))
            return _workers_ai_piece(result)
        piece = _openai_piece(obj)
        if self.dialect is Dialect.OPENAI_CHAT and not piece.error:
            choices = obj.get("choices") or [{}]
            msg = choices[0].get("message") or {}
            return Piece(
                content=msg.get("content") or "",
                reasoning=msg.get("reasoning_content") or msg.get("reasoning") or "",
                prompt_tokens=piece.prompt_tokens,
                completion_tokens=piece.completion_tokens,
            )
        return piece


def _flatten(messages: list[dict[str, str]]) -> str:
    return "\n".join(m["content"] for m in messages)


def _usage(obj: dict[str, Any]) -> tuple[int | None, int | None]:
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None, None
    p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (p if isinstance(p, int) else None), (c if isinstance(c, int) else None)


def _error_text(obj: dict[str, Any]) -> str:
    errors = obj.get("errors")
    if isinstance(errors, list) and errors:
        return json.dumps(errors[0])[:200]
    err = obj.get("error")
    return json.dumps(err)[:200] if err is not None else "error"


def _workers_ai_piece(obj: dict[str, Any]) -> Piece:
    if obj.get("errors") or obj.get("success") is False:
        return Piece(error=_error_text(obj))
    prompt, completion = _usage(obj)
    text = obj.get("response")
    return Piece(
        content=text if isinstance(text, str) else "",
        prompt_tokens=prompt,
        completion_tokens=completion,
    )


def _openai_piece(obj: dict[str, Any]) -> Piece:
    if "error" in obj and obj["error"] is not None:
        return Piece(error=_error_text(obj))
    prompt, completion = _usage(obj)
    content = reasoning = ""
    for choice in obj.get("choices") or ():
        if "text" in choice and isinstance(choice["text"], str):
            content += choice["text"]
        delta = choice.get("delta") or {}
        content += delta.get("content") or ""
        reasoning += delta.get("reasoning_content") or delta.get("reasoning") or ""
    return Piece(content, reasoning, prompt, completion)
