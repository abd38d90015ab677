"""`batchserve tenants add | revoke | list`: edit a tenants file.

Tokens are generated here, printed once (the last line of `add`'s stdout) and
stored only as SHA-256 hashes. The file is replaced atomically (write, fsync,
rename), so a gateway reloading it never reads half a file.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from serve.gateway.tenants import (
    DEFAULT_PLAN,
    hash_token,
    load_document,
    parse_expiry,
    parse_plans,
    parse_tenants_document,
)

TOKEN_PREFIX = "bsk-"


def add_parser(sub: Any) -> None:
    tenants = sub.add_parser("tenants", help="manage tenants and their tokens in a tenants file")
    actions = tenants.add_subparsers(dest="tenants_command", required=True)

    add = actions.add_parser("add", help="create a token (and the tenant if needed)")
    add.add_argument("--tenants-file", type=Path, required=True)
    add.add_argument("--tenant", required=True)
    add.add_argument("--account", action="append", default=[], help="account id it owns")
    add.add_argument("--plan", default=None)
    add.add_argument("--label", default="")
    add.add_argument("--expires", default=None, help="ISO 8601 time the token stops working")
    add.add_argument("--expires-in-days", type=float, default=None)

    revoke = actions.add_parser("revoke", help="remove a tenant's tokens")
    revoke.add_argument("--tenants-file", type=Path, required=True)
    revoke.add_argument("--tenant", required=True)
    revoke.add_argument("--label", default=None, help="only tokens with this label")

    listing = actions.add_parser("list", help="tenants, plans and token labels (no secrets)")
    listing.add_argument("--tenants-file", type=Path, required=True)


def save_document(path: Path, data: dict[str, Any]) -> None:
    parse_tenants_document(data)  # never write a file the gateway would refuse
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(data, f, sort_keys=False)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _tenant_entry(data: dict[str, Any], tenant_id: str) -> dict[str, Any] | None:
    for entry in data.get("tenants") or []:
        if str(entry.get("id")) == tenant_id:
            found: dict[str, Any] = entry
            return found
    return None


def add_token(
    path: Path,
    *,
    tenant_id: str,
    accounts: list[str],
    plan: str | None = None,
    label: str = "",
    expires_at: datetime | None = None,
) -> str:
    """Create the tenant if needed, add a token, return the token (the only copy)."""
    data = load_document(path)
    if plan is not None and plan not in parse_plans(data):
        raise ValueError(f"unknown plan {plan}: define it under `plans:` first")
    entry = _tenant_entry(data, tenant_id)
    if entry is None:
        if not accounts:
            raise ValueError("a new tenant needs at least one --account")
        entry = {"id": tenant_id, "plan": plan or DEFAULT_PLAN, "accounts": [], "tokens": []}
        data.setdefault("tenants", []).append(entry)
    elif plan is not None:
        entry["plan"] = plan
    owned = entry.setdefault("accounts", [])
    owned.extend(a for a in accounts if a not in owned)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    grant: dict[str, Any] = {"sha256": hash_token(token), "label": label}
    if expires_at is not None:
        grant["expires_at"] = expires_at.astimezone(UTC).isoformat()
    entry.setdefault("tokens", []).append(grant)
    save_document(path, data)
    return token


def revoke_tokens(path: Path, *, tenant_id: str, label: str | None = None) -> int:
    """Remove the tenant's tokens (those with `label`, or all); how many were removed."""
    data = load_document(path)
    entry = _tenant_entry(data, tenant_id)
    if entry is None:
        raise ValueError(f"no tenant {tenant_id}")
    tokens = entry.get("tokens") or []
    kept = [t for t in tokens if label is not None and str(t.get("label", "")) != label]
    entry["tokens"] = kept
    save_document(path, data)
    return len(tokens) - len(kept)


def describe(path: Path) -> list[str]:
    data = load_document(path)
    lines = []
    for entry in data.get("tenants") or []:
        accounts = ",".join(str(a) for a in entry.get("accounts") or [])
        lines.append(f"{entry['id']}  plan={entry.get('plan', DEFAULT_PLAN)}  accounts={accounts}")
        for t in entry.get("tokens") or []:
            expiry = parse_expiry(t.get("expires_at"))
            state = "no expiry" if expiry is None else f"expires {expiry.isoformat()}"
            if expiry is not None and expiry <= datetime.now(UTC):
                state = f"expired {expiry.isoformat()}"
            # A short hash prefix tells tokens apart; it does not reveal them.
            lines.append(f"  token {str(t['sha256'])[:12]}…  label={t.get('label', '')}  {state}")
    return lines


def cmd_tenants(ns: argparse.Namespace) -> int:
    try:
        if ns.tenants_command == "add":
            expires = parse_expiry(ns.expires)
            if ns.expires_in_days is not None:
                expires = datetime.now(UTC) + timedelta(days=ns.expires_in_days)
            token = add_token(
                ns.tenants_file,
                tenant_id=ns.tenant,
                accounts=list(ns.account),
                plan=ns.plan,
                label=ns.label,
                expires_at=expires,
            )
            print(f"token for tenant {ns.tenant} (shown once, store it now):", file=sys.stderr)
            print(token)
        elif ns.tenants_command == "revoke":
            count = revoke_tokens(ns.tenants_file, tenant_id=ns.tenant, label=ns.label)
            print(f"revoked {count} token(s) of tenant {ns.tenant}")
        else:
            print("\n".join(describe(ns.tenants_file)) or "no tenants")
    except (ValueError, KeyError, yaml.YAMLError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
