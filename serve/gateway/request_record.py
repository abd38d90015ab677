"""What one HTTP request did, gathered while it runs and settled once when it ends.

`RequestObserver` (the middleware) puts a `RequestRecord` in the ASGI scope; the
authenticator's caller tags the tenant, each `Completion` adds its tokens and
timings, the exception handler notes the error. Metrics and the access log line
are written from it exactly once, whichever way the request ended.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from starlette.types import Scope

from serve.errors import BatchserveError
from serve.gateway.tenants import Tenant

RECORD_KEY = "batchserve_record"
CLIENT_CLOSED = 499
"""Status logged for a request whose client went away first (nginx's convention)."""


@dataclass
class RequestRecord:
    dialect: str
    arrived_at: float = field(default_factory=time.monotonic)
    tenant: Tenant | None = None
    stream: bool = False
    clamped: bool = False
    prompt_tokens: int = 0
    # The prompts counted in prompt_tokens (their index in a batch of prompts).
    counted_prompts: set[int] = field(default_factory=set)
    completion_tokens: int = 0
    submitted_at: float | None = None
    first_token_at: float | None = None
    finish_reason: str | None = None
    # The error that decided the outcome (raised before or after the first byte).
    failure: BaseException | None = None
    disconnected: bool = False
    # Only kept when the `log_prompts` debug setting is on.
    prompt_token_ids: Sequence[int] | None = None
    output: list[str] | None = None

    @property
    def plan(self) -> str:
        return "none" if self.tenant is None else self.tenant.plan.name

    def count_prompt(self, index: int, tokens: int) -> bool:
        """Add the tokens of prompt `index` once (the first of its choices to start);
        True when they were added."""
        if index in self.counted_prompts:
            return False
        self.counted_prompts.add(index)
        self.prompt_tokens += tokens
        return True

    def fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc

    def outcome_status(self, sent_status: int) -> int:
        """The status that describes the request: a failure after a 200 still counts as one."""
        failure = self.failure
        if failure is not None and sent_status < 400:
            return failure.status if isinstance(failure, BatchserveError) else 500
        if sent_status == 0:
            return CLIENT_CLOSED if self.disconnected else 500
        if self.disconnected and sent_status < 400:
            return CLIENT_CLOSED
        return sent_status


def record_of(scope: Scope) -> RequestRecord:
    """This request's record (a detached one when no observer runs, e.g. in unit tests)."""
    state = scope.setdefault("state", {})
    record = state.get(RECORD_KEY)
    if record is None:
        record = state[RECORD_KEY] = RequestRecord(dialect="workers_ai")
    assert isinstance(record, RequestRecord)
    return record
