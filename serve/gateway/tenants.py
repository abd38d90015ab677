"""Tenants and where they come from."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    tenant_id: str
    accounts: frozenset[str]
    plan: str = "default"

    def owns(self, account_id: str) -> bool:
        return account_id in self.accounts


class TenantStore(Protocol):
    def by_token_hash(self, token_sha256: str) -> Tenant | None: ...


class StaticTenantStore:
    """Tenants held in memory, keyed by the SHA-256 of their tokens."""

    def __init__(self, tokens: dict[str, Tenant]) -> None:
        self._tokens = dict(tokens)

    def by_token_hash(self, token_sha256: str) -> Tenant | None:
        return self._tokens.get(token_sha256)

    @classmethod
    def from_file(cls, path: Path) -> StaticTenantStore:
        """Read a tenants YAML file: `tenants: [{id, plan, accounts, tokens: [{sha256}]}]`."""
        data: Any = yaml.safe_load(path.read_text()) or {}
        tokens: dict[str, Tenant] = {}
        for entry in data.get("tenants", []):
            tenant = Tenant(
                tenant_id=str(entry["id"]),
                accounts=frozenset(str(a) for a in entry.get("accounts", [])),
                plan=str(entry.get("plan", "default")),
            )
            for token in entry.get("tokens", []):
                tokens[str(token["sha256"])] = tenant
        return cls(tokens)
