"""Tenants, their plans and their tokens, and where they come from.

A tenants file (YAML; in Kubernetes a mounted Secret) looks like::

    plans:
      standard:
        requests_per_minute: 600
        tokens_per_minute: 200000      # prompt + completion
        max_concurrent_streams: 16     # requests in flight, streaming or not
        allowed_models: ["@cf/qwen/qwen1.5-1.8b-chat"]   # omitted: every model
        weight: 1                      # share of the gateway queue when saturated
    tenants:
      - id: acme
        plan: standard
        accounts: [acme-prod]
        tokens:
          - {sha256: <hex>, label: ci, expires_at: 2027-01-01T00:00:00Z}

Only SHA-256 hashes of tokens are stored. `FileTenantStore` re-reads the file
when its modification time changes, so edits take effect without a restart.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import yaml

log = logging.getLogger(__name__)

DEFAULT_PLAN = "default"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Plan:
    """What a tenant may do; None means no limit.

    `max_concurrent_streams` (its name kept for existing tenants files) caps all of the
    tenant's requests in flight, streaming or not; an OpenAI request with `n` > 1 counts
    `n`."""

    name: str = DEFAULT_PLAN
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent_streams: int | None = None
    allowed_models: frozenset[str] | None = None
    weight: int = 1

    def allows_model(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models

    @classmethod
    def parse(cls, name: str, data: dict[str, Any]) -> Plan:
        def limit(key: str) -> int | None:
            value = data.get(key)
            if value is None:
                return None
            if int(value) < 0:
                raise ValueError(f"plan {name}: {key} must be >= 0")
            return int(value)

        models = data.get("allowed_models")
        weight = int(data.get("weight", data.get("priority", 1)))
        if weight < 1:
            raise ValueError(f"plan {name}: weight must be >= 1")
        return cls(
            name=name,
            requests_per_minute=limit("requests_per_minute"),
            tokens_per_minute=limit("tokens_per_minute"),
            max_concurrent_streams=limit("max_concurrent_streams"),
            allowed_models=None if models is None else frozenset(str(m) for m in models),
            weight=weight,
        )


@dataclass(frozen=True)
class Tenant:
    tenant_id: str
    accounts: frozenset[str]
    plan: Plan = field(default_factory=Plan)

    def owns(self, account_id: str) -> bool:
        return account_id in self.accounts


@dataclass(frozen=True)
class TokenGrant:
    """One token of a tenant: its hash, a label and an optional expiry."""

    tenant: Tenant
    label: str = ""
    expires_at: datetime | None = None

    def valid_at(self, now: datetime) -> bool:
        return self.expires_at is None or now < self.expires_at


class TenantStore(Protocol):
    def by_token_hash(self, token_sha256: str) -> Tenant | None:
        """The tenant of a live token (None: unknown, expired or revoked)."""
        ...


class StaticTenantStore:
    """Tenants held in memory, keyed by the SHA-256 of their tokens."""

    def __init__(self, tokens: dict[str, Tenant | TokenGrant]) -> None:
        self._grants = {
            digest: g if isinstance(g, TokenGrant) else TokenGrant(g)
            for digest, g in tokens.items()
        }

    def by_token_hash(self, token_sha256: str) -> Tenant | None:
        grant = self._grants.get(token_sha256)
        if grant is None or not grant.valid_at(datetime.now(UTC)):
            return None
        return grant.tenant

    @classmethod
    def from_file(cls, path: Path) -> StaticTenantStore:
        return cls(dict(parse_tenants_document(load_document(path))))


def load_document(path: Path) -> dict[str, Any]:
    data: Any = yaml.safe_load(path.read_text()) if path.exists() else None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a tenants file is a mapping with `plans` and `tenants`")
    return data


def parse_expiry(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    when = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def parse_plans(data: dict[str, Any]) -> dict[str, Plan]:
    plans = {DEFAULT_PLAN: Plan()}
    for name, body in (data.get("plans") or {}).items():
        plans[str(name)] = Plan.parse(str(name), dict(body or {}))
    return plans


def parse_tenants_document(data: dict[str, Any]) -> dict[str, TokenGrant]:
    """token sha256 -> grant; raises ValueError on an inconsistent file."""
    plans = parse_plans(data)
    grants: dict[str, TokenGrant] = {}
    for entry in data.get("tenants") or []:
        plan_name = str(entry.get("plan", DEFAULT_PLAN))
        if plan_name not in plans:
            raise ValueError(f"tenant {entry.get('id')}: unknown plan {plan_name}")
        tenant = Tenant(
            tenant_id=str(entry["id"]),
            accounts=frozenset(str(a) for a in entry.get("accounts") or []),
            plan=plans[plan_name],
        )
        for token in entry.get("tokens") or []:
            digest = str(token["sha256"]).lower()
            grants[digest] = TokenGrant(
                tenant=tenant,
                label=str(token.get("label", "")),
                expires_at=parse_expiry(token.get("expires_at")),
            )
    return grants


class FileTenantStore:
    """A tenants file, re-read when it changes (checked on lookup, at most every `check_s`).

    A file that fails to parse is logged and the last good version stays in force.
    """

    def __init__(self, path: Path, *, check_s: float = 1.0) -> None:
        self._path = path
        self._check_s = check_s
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = float("-inf")
        self._store = StaticTenantStore({})
        self._reload(force=True)

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _reload(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked_at < self._check_s:
            return
        with self._lock:
            self._checked_at = now
            stamp = self._file_stamp()
            if stamp == self._stamp and not force:
                return
            try:
                grants = parse_tenants_document(load_document(self._path))
            except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as err:
                if force and self._stamp is None:
                    raise
                log.warning("tenants file %s not reloaded: %s", self._path, err)
                return
            self._store = StaticTenantStore(dict(grants))
            self._stamp = stamp
            log.info("tenants file %s loaded: %d tokens", self._path, len(grants))

    def by_token_hash(self, token_sha256: str) -> Tenant | None:
        self._reload()
        return self._store.by_token_hash(token_sha256)
