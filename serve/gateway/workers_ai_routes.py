"""The Workers AI text-generation route: thin handlers over `CompletionService`."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncGenerator, Callable
from typing import Any, Final

from fastapi import APIRouter, Request
from starlette.responses import Response

from serve import sse
from serve.errors import BadInput, LoraUnsupported
from serve.gateway import openapi_doc
from serve.gateway.admission import Caller, rate_headers
from serve.gateway.body import read_body
from serve.gateway.completion import Completion
from serve.gateway.context import GatewayContext
from serve.gateway.envelope import envelope
from serve.gateway.error_wire import Dialect, as_batchserve_error, error_body
from serve.gateway.keepalive import heartbeat_until_first
from serve.gateway.request_id import mark_reached_inference
from serve.gateway.request_record import record_of
from serve.gateway.stream_guard import GuardedStreamingResponse
from serve.protocol.workers_ai import parse_json_body, parse_run_input, published_schema

RUN_PATH = "/client/v4/accounts/{account_id}/ai/run/{model:path}"
SCHEMA_PATH = "/client/v4/accounts/{account_id}/ai/models/schema"
CAP_NOTE_CODE = 5022
# Cloudflare's padding alphabet for the `p` field of stream events.
PAD_ALPHABET: Final = "abdefghijklmnoprstuvxyz1234567890"


def cap_note(cap: int) -> dict[str, Any]:
    return {
        "code": CAP_NOTE_CODE,
        "message": (
            f"max_tokens was capped at {cap} for a non-streaming request; "
            "send stream: true for longer output"
        ),
    }


def padded_event(payload: dict[str, Any]) -> bytes:
    """An event with a random-length `p` field, so frame sizes do not reveal token lengths."""
    pad = PAD_ALPHABET[: 1 + secrets.randbelow(len(PAD_ALPHABET))]
    return sse.event({**payload, "p": pad})


async def sse_stream(
    completion: Completion, *, padding: bool = False
) -> AsyncGenerator[bytes, None]:
    """Workers AI SSE: `{"response": delta}` events, a usage event, then [DONE]."""
    event: Callable[[dict[str, Any]], bytes] = padded_event if padding else sse.event
    try:
        # aclosing: a close of this stream (client gone, stall guard) closes the deltas
        # now, which aborts the engine request, rather than when they are collected.
        async with contextlib.aclosing(completion.deltas()) as deltas:
            async for text in deltas:
                yield event({"response": text})
    except Exception as exc:
        # Failure after the first byte: one error event, then [DONE].
        err = as_batchserve_error(exc)
        yield event({"response": "", **error_body(err, Dialect.WORKERS_AI)})
        yield sse.DONE
        return
    yield event(
        {
            "response": "",
            "usage": completion.usage.as_dict(),
            "finish_reason": completion.finish_reason or "stop",
        }
    )
    yield sse.DONE


def workers_ai_router(ctx: GatewayContext) -> APIRouter:
    router = APIRouter()

    @router.post(RUN_PATH, **openapi_doc.workers_ai_run())
    async def run(request: Request, account_id: str, model: str) -> Response:
        tenant = ctx.authenticate(request, account_id)
        ctx.require_model(model)
        ctx.refuse_if_full(tenant)
        raw = await read_body(request, ctx.max_body_bytes, ctx.body_timeout_s)
        run_input = parse_run_input(ctx.refuse_too_many_messages(parse_json_body(raw)))
        if run_input.lora is not None:
            raise LoraUnsupported(model)
        if run_input.messages is not None:
            prompt_ids = await ctx.engine.encode_chat(run_input.messages)
        elif run_input.raw:
            prompt_ids = await ctx.engine.encode_raw(run_input.prompt or "")
        else:
            prompt_ids = await ctx.engine.encode_chat(ctx.user_turn(run_input.prompt or ""))
        prepared = ctx.completions.prepare(
            request_id=mark_reached_inference(request.scope),
            prompt_token_ids=prompt_ids,
            asked=run_input.sampling(),
            stream=run_input.stream,
            cache_salt=ctx.cache_salt(tenant),
            record=record_of(request.scope),
        )
        completion = await ctx.completions.start(
            prepared,
            Caller.of(tenant, account_id, model),
            headers_out=rate_headers(request.scope),
            wait=not run_input.reject_if_busy,
        )
        try:
            if run_input.stream:
                frames = sse_stream(completion, padding=ctx.stream_padding)
                return GuardedStreamingResponse(
                    heartbeat_until_first(frames, ctx.stream_heartbeat_s),
                    stall_s=ctx.stream_stall_s,
                    on_close=completion.abandon,  # a stream that never pulled a frame
                    # Exactly `text/event-stream`, as the hosted API sends it (no charset).
                    headers={"content-type": "text/event-stream"},
                )
            text = await completion.collect()
        except BaseException:
            await completion.abandon()  # admitted, never started: free its slots now
            raise
        notes = [cap_note(ctx.completions.budget.non_stream_max_tokens)] if prepared.clamped else []
        result = {
            "response": text,
            "usage": completion.usage.as_dict(),
            "finish_reason": completion.finish_reason or "stop",
        }
        return envelope(result, notes)

    @router.get(SCHEMA_PATH, **openapi_doc.workers_ai_schema())
    async def schema(request: Request, account_id: str) -> Response:
        ctx.authenticate(request, account_id)
        # Read here rather than declared: a missing `?model=` is a 400 of this dialect,
        # after authentication (FastAPI would answer 422 before it).
        model = request.query_params.get("model")
        if not model:
            raise BadInput("the query parameter model is required", param="model")
        ctx.require_model(model)
        return envelope(published_schema(), [])

    return router
