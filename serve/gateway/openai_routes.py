"""The OpenAI dialect: chat completions and completions, thin handlers over `CompletionService`.

Served at `/v1/...` (any account of the caller's token) and at
`/client/v4/accounts/{account_id}/ai/v1/...` (the account must be the token's).
The non-streaming cap and the context-window rule are `plan_sampling`'s, exactly
as on the Workers AI route; when the cap lowered max_tokens, the response carries
the `x-batchserve-max-tokens-cap` header (and `finish_reason: "length"` if it was hit).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Final

from fastapi import APIRouter, Request
from starlette.responses import Response

from serve import sse
from serve.errors import BadInput
from serve.gateway import openapi_doc
from serve.gateway.admission import Caller, rate_headers
from serve.gateway.body import read_body
from serve.gateway.choices import Choices, choice_request_id, choice_seed
from serve.gateway.completion import PreparedRequest
from serve.gateway.context import GatewayContext
from serve.gateway.error_wire import Dialect, as_batchserve_error, error_body
from serve.gateway.request_id import mark_reached_inference
from serve.gateway.request_record import record_of
from serve.gateway.stream_guard import GuardedStreamingResponse
from serve.gateway.tenants import Tenant
from serve.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    Prompt,
    ResponseMeta,
    check_token_ids,
    chunk_object,
    completion_object,
    finish_reason,
    parse_chat_request,
    parse_completion_request,
    usage_chunk,
)
from serve.protocol.workers_ai import parse_json_body

MAX_N: Final = 8
"""The most choices (`n`) of one prompt a request may ask for; more is a 400 naming `n`.

Every choice of every prompt (prompts x n on /v1/completions, which takes a batch of
prompts) is one engine request holding one of the replica's admission slots, and all of
them are admitted together. So prompts x n is also bounded by the replica's slots
(`CompletionService.max_choices`) and by the plan's `max_concurrent_streams`: beyond
either the request could never be admitted, and a 429 would have its client retry for
ever. Over it is a 400 naming `n` (one prompt) or `prompt` (a batch). A batch is not
held to MAX_N: it is what its client would otherwise send as as many requests at once,
which the same slots and plan limit."""

CAP_HEADER: Final = "x-batchserve-max-tokens-cap"
_PREFIXES: Final = ("/v1", "/client/v4/accounts/{account_id}/ai/v1")

OpenAIRequest = ChatCompletionRequest | CompletionRequest


async def sse_stream(
    choices: Choices, meta: ResponseMeta, include_usage: bool
) -> AsyncIterator[bytes]:
    """`chat.completion.chunk` (or `text_completion`) events, the usage chunk, then [DONE]."""
    count = len(choices.completions)
    if meta.chat:
        for index in range(count):
            yield sse.event(chunk_object(meta, index, first=True, with_usage=include_usage))
    try:
        # aclosing: a close of this stream closes every choice now (engine requests aborted).
        async with contextlib.aclosing(choices.merged()) as merged:
            async for index, text in merged:
                if text is None:
                    reason = finish_reason(choices.completions[index].finish_reason)
                    yield sse.event(
                        chunk_object(meta, index, finish=reason, with_usage=include_usage)
                    )
                else:
                    yield sse.event(chunk_object(meta, index, text=text, with_usage=include_usage))
    except Exception as exc:
        # Failure after the first byte: one error event (the SDK raises APIError), then [DONE].
        yield sse.event(error_body(as_batchserve_error(exc), Dialect.OPENAI))
        yield sse.DONE
        return
    if include_usage:
        yield sse.event(usage_chunk(meta, choices.usage.as_openai_dict()))
    yield sse.DONE


def refuse_unadmissible(n: int, prompts: int, *, slots: int, tenant: Tenant) -> None:
    """A 400 for more choices than could ever be admitted at once (`MAX_N`)."""
    if n > MAX_N:
        raise BadInput(f"n must be <= {MAX_N}", param="n")
    streams = tenant.plan.max_concurrent_streams
    most = slots if streams is None else min(slots, streams)
    if prompts * n <= most:
        return
    if prompts == 1:
        raise BadInput(f"n must be <= {most}", param="n")
    raise BadInput(
        f"prompt: {prompts} prompts with n={n} ask for {prompts * n} completions; "
        f"at most {most} per request",
        param="prompt",
    )


def openai_router(ctx: GatewayContext) -> APIRouter:
    router = APIRouter()

    async def respond(
        request: Request, tenant: Tenant, body: OpenAIRequest, prompt_ids: Sequence[list[int]]
    ) -> Response:
        """Choice i of prompt p is choice p*n + i of the response (OpenAI's order)."""
        request_id = mark_reached_inference(request.scope)
        tenant_salt = ctx.cache_salt(tenant)
        asked = body.sampling()
        total = len(prompt_ids) * body.n
        prepared = [
            ctx.completions.prepare(
                request_id=choice_request_id(request_id, p * body.n + i, total),
                prompt_token_ids=ids,
                asked=replace(asked, seed=choice_seed(body.seed, i)),
                stream=body.stream,
                cache_salt=tenant_salt,
                record=record_of(request.scope),
                prompt_index=p,
            )
            for p, ids in enumerate(prompt_ids)
            for i in range(body.n)
        ]
        choices = await Choices.start(
            ctx.completions,
            prepared,
            Caller.of(tenant, request.path_params.get("account_id"), ctx.model_name),
            request_id=request_id,
            headers_out=rate_headers(request.scope),
            wait=not body.reject_if_busy,
        )
        try:
            return await reply(body, choices, request_id, prepared[0])
        except BaseException:
            await choices.abandon()  # admitted, never started: free their slots now
            raise

    async def reply(
        body: OpenAIRequest, choices: Choices, request_id: str, first: PreparedRequest
    ) -> Response:
        prefix = "chatcmpl-" if isinstance(body, ChatCompletionRequest) else "cmpl-"
        meta = ResponseMeta(
            id=prefix + request_id.replace("-", ""),
            created=int(time.time()),
            model=ctx.model_name,
            chat=isinstance(body, ChatCompletionRequest),
        )
        cap = first.request.sampling.max_tokens
        headers = {CAP_HEADER: str(cap)} if first.clamped else {}
        if body.stream:
            return GuardedStreamingResponse(
                sse_stream(choices, meta, body.include_usage),
                stall_s=ctx.stream_stall_s,
                on_close=choices.abandon,  # a stream that never started its choices
                media_type="text/event-stream",
                headers=headers,
            )
        texts = await choices.collect()
        finished = [finish_reason(c.finish_reason) for c in choices.completions]
        result = completion_object(
            meta, list(zip(texts, finished, strict=True)), choices.usage.as_openai_dict()
        )
        return Response(
            json.dumps(result, ensure_ascii=False, separators=(",", ":")),
            media_type="application/json",
            headers=headers,
        )

    def check_choices(tenant: Tenant, body: OpenAIRequest, prompts: int) -> None:
        slots = ctx.completions.max_choices
        refuse_unadmissible(body.n, prompts, slots=slots, tenant=tenant)

    async def encode_prompts(prompts: Sequence[Prompt]) -> list[list[int]]:
        """Text is tokenized verbatim; token ids go to the engine as they are."""
        vocab_size = ctx.engine.info.vocab_size
        out = []
        for prompt in prompts:
            if isinstance(prompt, str):
                out.append(await ctx.engine.encode_raw(prompt))
            else:
                check_token_ids(prompt, vocab_size)
                out.append(prompt)
        return out

    def authenticate(request: Request) -> Tenant:
        # The bare /v1 routes have no account in the path: any account of the token.
        tenant = ctx.authenticate(request, request.path_params.get("account_id"))
        ctx.refuse_if_full(tenant)  # before the body is read: a burst's excess costs little
        return tenant

    async def chat_completions(request: Request) -> Response:
        tenant = authenticate(request)
        raw = await read_body(request, ctx.max_body_bytes, ctx.body_timeout_s)
        body = parse_chat_request(ctx.refuse_too_many_messages(parse_json_body(raw)))
        ctx.require_model(body.model)
        check_choices(tenant, body, 1)
        return await respond(
            request, tenant, body, [await ctx.engine.encode_chat(body.chat_messages())]
        )

    async def completions(request: Request) -> Response:
        tenant = authenticate(request)
        raw = await read_body(request, ctx.max_body_bytes, ctx.body_timeout_s)
        body = parse_completion_request(parse_json_body(raw))
        ctx.require_model(body.model)
        prompts = body.prompts
        check_choices(tenant, body, len(prompts))
        return await respond(request, tenant, body, await encode_prompts(prompts))

    chat_doc = openapi_doc.openai_chat_completions(ctx.model_name)
    completions_doc = openapi_doc.openai_completions(ctx.model_name)
    for prefix in _PREFIXES:
        scoped = "{account_id}" in prefix
        router.add_api_route(
            f"{prefix}/chat/completions",
            chat_completions,
            methods=["POST"],
            **(openapi_doc.with_account(chat_doc) if scoped else chat_doc),
        )
        router.add_api_route(
            f"{prefix}/completions",
            completions,
            methods=["POST"],
            **(openapi_doc.with_account(completions_doc) if scoped else completions_doc),
        )
    return router
