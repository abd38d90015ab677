"""What the route handlers share: the composition `build_app` hands them."""

from __future__ import annotations

from dataclasses import dataclass

from serve.errors import UnknownModel
from serve.gateway.auth import Authenticator
from serve.gateway.completion import CompletionService
from serve.gateway.tenants import Tenant
from serve.replica.engine import ChatMessage, Engine


@dataclass(frozen=True)
class GatewayContext:
    model_name: str
    engine: Engine
    authenticator: Authenticator
    completions: CompletionService
    max_body_bytes: int
    replica_id: str = "local"
    # Inside a Ray Serve replica (Serve sets and echoes x-request-id itself).
    behind_serve: bool = False

    def require_model(self, name: str) -> None:
        if name != self.model_name:
            raise UnknownModel(name)

    @staticmethod
    def user_turn(prompt: str) -> list[ChatMessage]:
        """An unscoped prompt becomes a single user message (then the chat template)."""
        return [ChatMessage(role="user", content=prompt)]

    @staticmethod
    def cache_salt(tenant: Tenant) -> str:
        """Prefix-cache entries are keyed per tenant, so no tenant can probe another's."""
        return f"tenant:{tenant.tenant_id}"
