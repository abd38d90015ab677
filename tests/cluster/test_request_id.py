"""X-Request-Id on the real cluster: Serve echoes the request id itself (its own
RequestIdMiddleware on HAProxy's backends, the replicas' direct-ingress servers); the id
the client gets back must be our sanitised one, once, and the same as `cf-ray`."""

from __future__ import annotations

import httpx
import pytest

from serve.gateway.request_id import is_sane
from tests.cluster.conftest import Cluster

pytestmark = pytest.mark.cluster


def echoed(r: httpx.Response) -> list[str]:
    return [v for k, v in r.headers.multi_items() if k.lower() == "x-request-id"]


@pytest.mark.parametrize("given", ["x" * 300, "bad id <script>"], ids=["over-long", "odd"])
def test_odd_request_id_is_replaced(cluster: Cluster, given: str) -> None:
    for url in (cluster.url, *cluster.replica_urls):  # through HAProxy, and each replica
        r = httpx.get(
            f"{url}/v1/models", headers={**cluster.auth, "X-Request-Id": given}, timeout=30
        )
        assert r.status_code == 200, (url, r.text)
        (rid,) = echoed(r)
        assert rid != given and is_sane(rid) and len(rid) <= 128, (url, rid)
        assert r.headers["cf-ray"] == rid, url


def test_sane_request_id_is_kept(cluster: Cluster) -> None:
    r = httpx.post(
        cluster.run_url,
        headers={**cluster.auth, "X-Request-Id": "client-trace-42"},
        json={"prompt": "hi", "max_tokens": 2},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert echoed(r) == ["client-trace-42"] and r.headers["cf-ray"] == "client-trace-42"
