"""Who is calling: Bearer token -> tenant, and may they use this account."""

from __future__ import annotations

from starlette.datastructures import Headers

from serve.errors import (
    AccountForbidden,
    AuthenticationFailed,
    MalformedAuthorization,
    MissingCredentials,
)
from serve.gateway.tenants import Tenant, TenantStore, hash_token


class Authenticator:
    def __init__(self, store: TenantStore) -> None:
        self._store = store

    def authenticate(self, headers: Headers, account_id: str | None) -> Tenant:
        """The tenant behind the request; `account_id` None means any account."""
        header = headers.get("authorization")
        if not header and ("x-auth-key" in headers or "x-auth-email" in headers):
            # Cloudflare's global API key: nothing here could check it.
            raise MissingCredentials(
                "Missing Authorization header: only API tokens are accepted here "
                "(Authorization: Bearer <token>), not X-Auth-Key / X-Auth-Email API keys"
            )
        if not header:
            raise MissingCredentials()
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise MalformedAuthorization()
        digest = hash_token(token)
        tenant = self._store.by_token_hash(digest)
        # The lookup is keyed by the SHA-256 of the secret, never the secret itself,
        # so its timing cannot leak the token byte by byte.
        if tenant is None:
            raise AuthenticationFailed()
        if account_id is not None and not tenant.owns(account_id):
            raise AccountForbidden()
        return tenant
