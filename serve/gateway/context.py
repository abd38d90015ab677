"""What the route handlers share: the composition `build_app` hands them."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from serve.errors import ContextWindowExceeded, UnknownModel
from serve.gateway.auth import Authenticator
from serve.gateway.completion import CompletionService
from serve.gateway.ledger import UsageLedger
from serve.gateway.request_record import record_of
from serve.gateway.tenants import Tenant
from serve.replica.engine import ChatMessage, Engine


@dataclass(frozen=True)
class GatewayContext:
    model_name: str
    engine: Engine
    authenticator: Authenticator
    completions: CompletionService
    max_body_bytes: int
    # A request body not fully received this long after reading starts: 408/3007.
    body_timeout_s: float = 60.0
    replica_id: str = "local"
    # Inside a Ray Serve replica (Serve sets and echoes x-request-id itself).
    behind_serve: bool = False
    # Workers AI streams: pad every event; heartbeat comments until the first token.
    stream_padding: bool = False
    stream_heartbeat_s: float = 15.0
    # A stream whose client has not taken a frame for this long is aborted (None: no
    # guard in the app; behind Serve, the one on Serve's own server does it).
    stream_stall_s: float | None = 30.0
    # Where finished requests are recorded (the usage route reads it).
    ledger: UsageLedger | None = None

    def authenticate(self, request: Request, account_id: str | None) -> Tenant:
        """The caller's tenant (also noted on the request's record for metrics and logs)."""
        tenant = self.authenticator.authenticate(request.headers, account_id)
        record_of(request.scope).tenant = tenant
        return tenant

    def refuse_if_full(self, tenant: Tenant) -> None:
        """Before a generation's body is read: 429/3040 now if the replica's fair queue
        would refuse it anyway (see `Gate.refuse_early`)."""
        gate = self.completions.gate
        if gate is not None:
            gate.refuse_early(tenant.tenant_id)

    def require_model(self, name: str) -> None:
        if name != self.model_name:
            raise UnknownModel(name)

    def refuse_too_many_messages(self, payload: object) -> object:
        """The parsed body, unless its `messages` cannot fit the context window: every
        message is at least one token. Checked before the schema and the tokenizer,
        which take tens of microseconds a message on the event loop (a 4 MiB body
        carries over 100,000 of them)."""
        messages = payload.get("messages") if isinstance(payload, dict) else None
        window = self.completions.budget.context_window
        if isinstance(messages, list) and len(messages) >= window:
            raise ContextWindowExceeded(len(messages) + 1, window, param="messages")
        return payload

    @staticmethod
    def user_turn(prompt: str) -> list[ChatMessage]:
        """An unscoped prompt becomes a single user message (then the chat template)."""
        return [ChatMessage(role="user", content=prompt)]

    @staticmethod
    def cache_salt(tenant: Tenant) -> str:
        """Prefix-cache entries are keyed per tenant, so no tenant can probe another's."""
        return f"tenant:{tenant.tenant_id}"
