"""Prefix-cache isolation on the real engine: the cache salt comes from the tenant, so
tenant B never hits the blocks tenant A's prompt left behind, while A's repeat does."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.cluster.conftest import MODEL, TENANTS, Cluster

pytestmark = pytest.mark.cluster

WORDS = ("the", "sea", "fox", "owl", "river", "stone", "light", "cloud", "tree", "night")


def cached_tokens(replica: str, tenant: str, prompt: str) -> tuple[int, int]:
    """(prompt tokens, prompt tokens served from the prefix cache) for one request."""
    token, _account = TENANTS[tenant]
    r = httpx.post(
        f"{replica}/v1/completions",
        headers={"Authorization": f"Bearer {token}"},
        json={"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    return usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]


def test_prefix_cache_hits_never_cross_tenants(cluster: Cluster) -> None:
    # One replica (its engine holds the cache); a prompt no earlier test sent.
    replica = cluster.replica_urls[0]
    nonce = uuid.uuid4().hex
    prompt = nonce + " " + " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(700))
    total, first = cached_tokens(replica, "a", prompt)
    assert total > 512 and first == 0
    _, b_first = cached_tokens(replica, "b", prompt)
    _, a_again = cached_tokens(replica, "a", prompt)
    _, b_again = cached_tokens(replica, "b", prompt)
    assert b_first == 0, f"tenant B hit {b_first} of tenant A's cached prompt tokens"
    assert a_again >= total // 2, f"A's repeat hit only {a_again} of {total} tokens"
    assert b_again >= total // 2, "B's own repeat should hit its own cache"
