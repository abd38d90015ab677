"""A scripted engine for fast gateway tests (the cluster tier runs real vLLM)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

from serve.errors import BadInput, EngineFailure
from serve.replica.engine import (
    ChatMessage,
    EngineInfo,
    FinishReason,
    GenerateRequest,
    SamplingOptions,
    TokenDelta,
)


@dataclass
class FakeEngine:
    """Tokens are characters; the reply echoes a fixed text word by word."""

    reply: str = "Hello from the fake engine."
    # The reply when structured (JSON) output is requested.
    json_reply: str = '{"answer": "fake"}'
    context_window: int = 4096
    # Tokens are characters: every Unicode code point is an id.
    vocab_size: int = 0x110000
    delay_s: float = 0.0
    fail_after: int | None = None
    # After this many deltas the engine stops producing (a stopped EngineCore).
    stall_after: int | None = None
    # What `check_health` raises (e.g. `EngineStalled`); None: healthy.
    health_error: Exception | None = None
    requests: list[GenerateRequest] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    running: set[str] = field(default_factory=set)
    # Deltas produced so far, all requests together (how far a generation got).
    produced: int = 0

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(
            weights="fake", context_window=self.context_window, vocab_size=self.vocab_size
        )

    async def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        text = "".join(f"<{m.role}>{m.content}" for m in messages) + "<assistant>"
        return [ord(c) for c in text]

    async def encode_raw(self, prompt: str) -> list[int]:
        return [ord(c) for c in prompt]

    def check_sampling(self, options: SamplingOptions) -> None:
        """Like vLLM's grammar compiler, refuses a `response_format` schema that is not
        a valid JSON schema."""
        if options.json_schema is None:
            return
        import jsonschema

        try:
            jsonschema.validators.validator_for(options.json_schema).check_schema(
                options.json_schema
            )
        except jsonschema.SchemaError as exc:
            raise BadInput(f"Grammar error: {exc.message}", param="response_format") from exc

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[TokenDelta, None]:
        self.requests.append(request)
        self.running.add(request.request_id)
        sampling = request.sampling
        structured = sampling.json_schema is not None or sampling.json_object
        words = [w + " " for w in (self.json_reply if structured else self.reply).split(" ")]
        words[-1] = words[-1].rstrip()
        budget = sampling.max_tokens
        done = False
        text = ""
        try:
            for i, word in enumerate(words[:budget]):
                if self.fail_after is not None and i >= self.fail_after:
                    raise EngineFailure()
                if self.stall_after is not None and i >= self.stall_after:
                    await asyncio.Event().wait()
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                hits = [(text + word).find(s) for s in sampling.stop if s in text + word]
                if hits:  # like vLLM: the output ends before the stop string
                    yield TokenDelta(
                        text=(text + word)[: min(hits)][len(text) :],
                        new_tokens=1,
                        finish_reason="stop",
                    )
                    break
                text += word
                last = i == min(len(words), budget) - 1
                reason: FinishReason | None = None
                if last:
                    reason = "length" if budget < len(words) else "stop"
                self.produced += 1
                yield TokenDelta(text=word, new_tokens=1, finish_reason=reason)
            done = True
        finally:
            self.running.discard(request.request_id)
            (self.finished if done else self.aborted).append(request.request_id)

    def num_unfinished_requests(self) -> int:
        return len(self.running)

    async def check_health(self) -> None:
        if self.health_error is not None:
            raise self.health_error

    def shutdown(self) -> None:
        return None


async def until_running(engine: FakeEngine, timeout_s: float = 5.0) -> None:
    """Until a request is in `engine` (one started in a task of its own)."""
    for _ in range(int(timeout_s / 0.01)):
        if engine.running:
            return
        await asyncio.sleep(0.01)
    assert engine.running, f"no request reached the engine in {timeout_s} s"
