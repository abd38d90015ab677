"""One generation, from a tokenized prompt to settled usage; shared by both dialects.

`CompletionService.prepare` applies the token budget rules (default
max_tokens, the non-streaming cap, then the context window) and
`CompletionService.start` admits the request against the replica's capacity.
The returned `Completion` streams deltas and always settles its usage and
releases its slot, whichever way it ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

from serve.errors import (
    BatchserveError,
    ContextWindowExceeded,
    EngineStalled,
    OutOfCapacity,
    RequestTimeout,
)
from serve.gateway.admission import Caller, Gate, Ticket
from serve.gateway.request_record import RequestRecord
from serve.gateway.tracing import current_trace_headers
from serve.metrics import GatewayMetrics, yes_no
from serve.protocol.sampling import SamplingRequest
from serve.replica.engine import (
    Engine,
    FinishReason,
    GenerateRequest,
    SamplingOptions,
    TokenDelta,
)

# vLLM requires 0 < top_p <= 1 and repetition_penalty > 0; the Workers AI schema
# allows 0..2 for both, so schema-legal values outside vLLM's range are mapped
# to the nearest value vLLM accepts.
_MIN_TOP_P = 1e-6
_MIN_REPETITION_PENALTY = 0.01
# The schema allows temperature up to 5; vLLM accepts at most 2.
_MAX_TEMPERATURE = 2.0


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens found in the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }

    def as_openai_dict(self) -> dict[str, Any]:
        return {**self.as_dict(), "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


@dataclass(frozen=True)
class Budget:
    """The token limits that decide how a request may run."""

    context_window: int
    default_max_tokens: int
    default_temperature: float
    non_stream_max_tokens: int


@dataclass(frozen=True)
class PreparedRequest:
    request: GenerateRequest
    stream: bool
    # max_tokens was lowered to the non-streaming cap.
    clamped: bool
    # The HTTP request this generation belongs to (metrics labels, access log).
    record: RequestRecord
    # Which prompt of the request (a batch of prompts on /v1/completions) this completes:
    # the choices of one prompt count its tokens once.
    prompt_index: int = 0


def prompt_tokens_of(prepared: Sequence[PreparedRequest]) -> int:
    """The prompt tokens of one request's generations: each prompt counted once."""
    sizes = {p.prompt_index: len(p.request.prompt_token_ids) for p in prepared}
    return sum(sizes.values())


def plan_sampling(
    asked: SamplingRequest, *, prompt_tokens: int, stream: bool, budget: Budget
) -> tuple[SamplingOptions, bool]:
    """Apply defaults, the non-streaming cap and the context window rule.

    The cap comes first: a non-streaming request is refused only when even its
    clamped max_tokens does not fit the window.
    """
    max_tokens = asked.max_tokens if asked.max_tokens is not None else budget.default_max_tokens
    max_tokens = max(max_tokens, 1)
    clamped = not stream and max_tokens > budget.non_stream_max_tokens
    if clamped:
        max_tokens = budget.non_stream_max_tokens
    if prompt_tokens + max_tokens > budget.context_window:
        raise ContextWindowExceeded(prompt_tokens + max_tokens, budget.context_window)
    top_p = 1.0 if asked.top_p is None else min(max(asked.top_p, _MIN_TOP_P), 1.0)
    repetition = asked.repetition_penalty
    options = SamplingOptions(
        max_tokens=max_tokens,
        temperature=min(
            budget.default_temperature if asked.temperature is None else asked.temperature,
            _MAX_TEMPERATURE,
        ),
        top_p=top_p,
        top_k=asked.top_k,
        seed=asked.seed,
        repetition_penalty=1.0 if repetition is None else max(repetition, _MIN_REPETITION_PENALTY),
        frequency_penalty=asked.frequency_penalty or 0.0,
        presence_penalty=asked.presence_penalty or 0.0,
        stop=asked.stop,
        json_schema=asked.json_schema,
        json_object=asked.json_object and asked.json_schema is None,
    )
    return options, clamped


@dataclass(eq=False)  # identity: running generations are kept in a set
class Completion:
    """A running generation; iterate `deltas()` once, then read the totals."""

    prepared: PreparedRequest
    _service: CompletionService
    completion_tokens: int = 0
    finish_reason: FinishReason | None = None
    started_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    # Tenant admission (limits, fair share, usage record), settled when deltas() ends.
    ticket: Ticket | None = None
    failed: bool = False
    # Prompt tokens the engine found in its prefix cache.
    cached_tokens: int = 0
    # The request timeout: one timer per generation. While the generation waits for the
    # engine, `_waiter` is the waiting task; the timer cancels it (a stalled engine), else
    # it only sets `_ended`, checked before the next wait (a slow consumer). `_ended` is
    # the error the generation ends with: the timeout's, or an earlier one (`end`).
    _waiter: asyncio.Task[Any] | None = field(default=None, repr=False)
    _ended: BatchserveError | None = field(default=None, repr=False)
    _ending_task: asyncio.Task[Any] | None = field(default=None, repr=False)
    _cancelling: int = field(default=0, repr=False)
    # `deltas` began, or `abandon` ended the completion before it could.
    _started: bool = field(default=False, repr=False)

    @property
    def usage(self) -> Usage:
        prompt = len(self.prepared.request.prompt_token_ids)
        return Usage(prompt, self.completion_tokens, self.cached_tokens)

    async def deltas(self) -> AsyncGenerator[str, None]:
        """Yield text deltas; aborts the engine request if the consumer stops early.

        Per delta only a timestamp and a counter add; everything else is done once: the
        start in `_begin`, the end in `_wind_up`, on every exit path (finished, failed,
        client gone).
        """
        stream, timer, generated = self._begin()
        record = self.prepared.record
        keep = record.output
        finished = False
        try:
            while True:
                if self._ended is not None:
                    raise self._ended
                # Per step, not once: the first step may run in another task (the SSE
                # heartbeat's), the later ones in the response's.
                self._waiter = asyncio.current_task()
                try:
                    delta = await anext(stream)
                except StopAsyncIteration:
                    break
                except asyncio.CancelledError:
                    if self._cancelled_by_end():
                        raise self._ended or RequestTimeout() from None  # ours, not the caller's
                    raise
                finally:
                    self._waiter = None
                if delta.new_tokens:
                    now = time.monotonic()
                    if self.first_token_at is None:
                        self.first_token_at = now
                    self.last_token_at = now
                    self.completion_tokens += delta.new_tokens
                    generated.inc(delta.new_tokens)
                if delta.finish_reason is not None:
                    self.finish_reason = delta.finish_reason
                if delta.cached_tokens is not None:
                    self.cached_tokens = delta.cached_tokens
                if delta.text:
                    if keep is not None:
                        keep.append(delta.text)
                    yield delta.text
            finished = True
        except Exception as exc:
            self.failed = True
            record.fail(exc)
            raise
        finally:
            await self._wind_up(stream, timer, finished)

    def _begin(self) -> tuple[AsyncGenerator[TokenDelta, None], asyncio.TimerHandle, Counter]:
        """Count the generation as running, record its submission, start the engine
        request and the request timeout. Returns the engine's stream, the timer and the
        generated-tokens counter of the request's labels."""
        if self._started:
            raise RuntimeError("a completion is iterated once, and never after abandon()")
        self._started = True
        service, record, metrics = self._service, self.prepared.record, self._service.metrics
        service.inflight += 1
        service.running.add(self)
        if service.closing is not None:  # the replica is about to stop: fail at once
            self._ended = service.closing()
        generated = metrics.generated_tokens.labels(metrics.model, record.plan, record.dialect)
        self._submit(record, metrics)
        stream = service.engine.generate(self.prepared.request)
        timer = asyncio.get_running_loop().call_later(service.request_timeout_s, self.expire)
        return stream, timer, generated

    def _cancelled_by_end(self) -> bool:
        """Whether the cancel the wait for the engine just took is `end`'s (the timeout, a
        stalled engine, the replica's stop) with no cancel of the caller's since: `end`'s
        is taken back from the task (uncancel) either way."""
        task = self._ending_task
        return task is not None and task.uncancel() <= self._cancelling

    async def _wind_up(
        self, stream: AsyncGenerator[TokenDelta, None], timer: asyncio.TimerHandle, finished: bool
    ) -> None:
        """The end of `deltas`, whichever way it ended: the generation stops counting as
        running and is settled, the engine stream closed (which aborts an unfinished engine
        request), then this completion's share of the ticket ends."""
        service, record = self._service, self.prepared.record
        timer.cancel()
        service.inflight -= 1
        service.running.discard(self)
        self._settle(record, service.metrics, finished)
        try:
            # Closing the engine stream is what aborts an unfinished engine request.
            await stream.aclose()
        finally:
            if self.ticket is not None:  # before the caller writes the last byte
                await self._finish_ticket(self.ticket, finished)

    async def abandon(self) -> None:
        """End a completion that never started: its request ended first (the client gone
        before the stream pulled its first frame, a failure before the response). Its share
        of the ticket ends as aborted, and when it was the last, the slots are free before
        this awaits anything. A completion that started ends itself in `deltas`: no-op."""
        if self._started:
            return
        self._started = True
        if self.ticket is not None:
            await self._finish_ticket(self.ticket, finished=False)

    async def _finish_ticket(self, ticket: Ticket, finished: bool) -> None:
        """This completion's share of the ticket: counted (and, for the last, the slots
        freed) at once, then the settlement in a task of its own that a cancel of the
        caller does not cut. A client gone mid-stream cancels the response under
        Starlette's cancel scope, which cancels every later await of the task again:
        awaited in place, a settlement with a round trip (Redis) ended at its first, the
        tenant's stream lease stayed counted and no usage record was written."""
        last = ticket.complete_one(
            prompt_index=self.prepared.prompt_index,
            prompt_tokens=self.usage.prompt_tokens,
            completion_tokens=self.completion_tokens,
            status="ok" if finished else ("error" if self.failed else "aborted"),
            finish_reason=self.finish_reason,
            first_token_at=self.first_token_at,
        )
        if not last:
            return
        settling = asyncio.get_running_loop().create_task(ticket.gate.close(ticket))
        ticket.gate.background(settling)
        await asyncio.shield(settling)

    def expire(self) -> None:
        """The request timeout fired: end the generation with 408/3007."""
        self.end(RequestTimeout())

    def end(self, error: BatchserveError) -> None:
        """End the generation now with `error`: interrupt the wait for the engine if one
        is pending, else fail the next read. Later calls change nothing."""
        if self._ended is not None:
            return
        self._ended = error
        waiter = self._waiter
        if waiter is not None:
            self._ending_task, self._cancelling = waiter, waiter.cancelling()
            waiter.cancel()

    def _submit(self, record: RequestRecord, metrics: GatewayMetrics) -> None:
        now = time.monotonic()
        request = self.prepared.request
        record.stream = self.prepared.stream
        record.clamped = record.clamped or self.prepared.clamped
        prompt_tokens = len(request.prompt_token_ids)
        if record.count_prompt(self.prepared.prompt_index, prompt_tokens):
            metrics.prompt_tokens.labels(metrics.model, record.plan, record.dialect).inc(
                prompt_tokens
            )
        if record.output is not None:  # the log_prompts debug setting is on
            record.prompt_token_ids = request.prompt_token_ids
        if record.submitted_at is None:
            record.submitted_at = now
            metrics.queue_wait.labels(metrics.model, record.dialect).observe(
                now - record.arrived_at
            )
        if self.prepared.stream:
            metrics.inflight_streams.labels(metrics.model).inc()

    def _settle(self, record: RequestRecord, metrics: GatewayMetrics, finished: bool) -> None:
        model, dialect, stream = metrics.model, record.dialect, yes_no(self.prepared.stream)
        if self.prepared.stream:
            metrics.inflight_streams.labels(model).dec()
        record.completion_tokens += self.completion_tokens
        record.finish_reason = self.finish_reason or record.finish_reason
        if not finished and record.failure is None:
            record.disconnected = True
        first, last = self.first_token_at, self.last_token_at
        if first is None or last is None:
            return
        if record.first_token_at is None or first < record.first_token_at:
            record.first_token_at = first
        metrics.time_to_first_token.labels(model, dialect, stream).observe(
            first - record.arrived_at
        )
        if self.completion_tokens > 1:
            metrics.inter_token_latency.labels(model, dialect, stream).observe(
                (last - first) / (self.completion_tokens - 1)
            )

    async def collect(self) -> str:
        return "".join([text async for text in self.deltas()])


class CompletionService:
    """Admission and token budgets for one engine."""

    def __init__(
        self,
        engine: Engine,
        budget: Budget,
        *,
        max_inflight: int,
        retry_after_s: float,
        metrics: GatewayMetrics,
        gate: Gate | None = None,
        request_timeout_s: float = 300.0,
    ) -> None:
        self.engine = engine
        # A generation running longer is aborted with 408/3007 (`Completion.expire`).
        self.request_timeout_s = request_timeout_s
        # Tenant limits and the fair queue; None: only the in-flight cap below.
        self.gate = gate
        self.budget = budget
        self.metrics = metrics
        metrics.track_inflight(lambda: self.inflight, max_inflight)
        self.max_inflight = max_inflight
        self.retry_after_s = retry_after_s
        self.inflight = 0
        self.started_total = 0
        # Generations iterating their deltas now (`check_health`, `close` may end them).
        self.running: set[Completion] = set()
        # Set by `close`: the error every later generation fails with at once.
        self.closing: Callable[[], BatchserveError] | None = None

    @property
    def max_choices(self) -> int:
        """The most engine requests one HTTP request may start: all must hold a slot at
        once, so more than the replica has could never be admitted."""
        return self.max_inflight if self.gate is None else self.gate.queue.capacity

    async def check_health(self) -> None:
        """The engine's health check (Serve's, through the replica). A stalled engine also
        ends every running generation now with 408/3007: Serve is replacing the replica,
        and waiting for the request timeout would let the replica's shutdown cut them
        without an error."""
        try:
            await self.engine.check_health()
        except EngineStalled as exc:
            message = (
                "AiError: Request timeout: the inference engine made no progress "
                f"for {exc.stalled_s:.0f} s"
            )
            self.end_running(lambda: RequestTimeout(message))
            raise

    def end_running(self, error: Callable[[], BatchserveError]) -> None:
        """End every running generation now with an `error()` of its own."""
        for completion in list(self.running):
            completion.end(error())

    def close(self, error: Callable[[], BatchserveError]) -> None:
        """The replica is about to stop: end the running generations with `error()`, and
        every generation admitted later at its start."""
        self.closing = error
        self.end_running(error)

    def prepare(
        self,
        *,
        request_id: str,
        prompt_token_ids: Sequence[int],
        asked: SamplingRequest,
        stream: bool,
        cache_salt: str | None,
        record: RequestRecord | None = None,
        prompt_index: int = 0,
    ) -> PreparedRequest:
        options, clamped = plan_sampling(
            asked, prompt_tokens=len(prompt_token_ids), stream=stream, budget=self.budget
        )
        self.engine.check_sampling(options)
        request = GenerateRequest(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            sampling=options,
            cache_salt=cache_salt,
            trace_headers=current_trace_headers(),
        )
        # No record given (a caller outside a route, e.g. a test): a detached one.
        record = RequestRecord(dialect="workers_ai") if record is None else record
        return PreparedRequest(
            request=request,
            stream=stream,
            clamped=clamped,
            record=record,
            prompt_index=prompt_index,
        )

    async def start(
        self,
        prepared: PreparedRequest,
        caller: Caller | None = None,
        *,
        headers_out: dict[str, str] | None = None,
        wait: bool = True,
    ) -> Completion:
        """Admit the request or refuse it with 429/3040 (never queue without bound;
        with `wait` False, never queue at all)."""
        (completion,) = await self.start_all([prepared], caller, headers_out=headers_out, wait=wait)
        return completion

    async def start_all(
        self,
        prepared: Sequence[PreparedRequest],
        caller: Caller | None = None,
        *,
        request_id: str | None = None,
        headers_out: dict[str, str] | None = None,
        wait: bool = True,
    ) -> list[Completion]:
        """Admit all of one request's choices (of all its prompts) or none: the caller's
        plan limits, then a fair share of this replica's slots (waiting in the caller's
        queue if need be). The reservation counts every prompt once and every choice's
        max_tokens."""
        ticket: Ticket | None = None
        if self.gate is None or caller is None:
            if self.inflight + len(prepared) > self.max_inflight:
                raise OutOfCapacity(retry_after_s=self.retry_after_s, reason="queue_full")
        else:
            first = prepared[0].request
            ticket = await self.gate.admit(
                caller,
                request_id or first.request_id,
                prompt_tokens=prompt_tokens_of(prepared),
                max_tokens=first.sampling.max_tokens,
                choices=len(prepared),
                headers_out={} if headers_out is None else headers_out,
                wait=wait,
            )
        self.started_total += len(prepared)
        return [Completion(prepared=p, _service=self, ticket=ticket) for p in prepared]
