"""What `batchserve up` prints once the stack is healthy: how to call both dialects."""

from __future__ import annotations

import pytest

from serve.cli import _banner
from serve.gateway.tenants import hash_token
from serve.settings import DevTenant, Settings


def test_the_banner_shows_both_dialects_with_the_dev_tenant() -> None:
    settings = Settings(
        port=8123,
        dev_tenant=DevTenant(tenant_id="dev", account_id="acct-9", token_sha256=hash_token("t")),
    )
    banner = _banner(settings, "t")
    run = "http://127.0.0.1:8123/client/v4/accounts/acct-9/ai/run/@cf/qwen/qwen1.5-1.8b-chat"
    assert f"curl {run}" in banner and f"curl -N {run}" in banner
    assert "Authorization: Bearer t'" in banner
    assert "base_url=http://127.0.0.1:8123/v1  api_key=t  model=@cf/qwen/qwen1.5-1.8b-chat" in (
        banner
    )


def test_the_banner_names_the_replica_ports_the_local_config_scrapes() -> None:
    """A replacement replica takes the next port while its predecessor's is quarantined:
    the banner names the window deploy/prometheus/prometheus.yml scrapes."""
    from pathlib import Path

    import yaml

    config = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "prometheus.yml"
    (job,) = [
        c
        for c in yaml.safe_load(config.read_text())["scrape_configs"]
        if c["job_name"] == "batchserve"
    ]
    ports = sorted(int(t.rsplit(":", 1)[1]) for s in job["static_configs"] for t in s["targets"])
    banner = " ".join(_banner(Settings(), None).split())
    assert f"scrapes {ports[0]}-{ports[-1]}" in banner
    assert "quarantined" in banner


def test_the_banner_shows_metrics_on_a_replica_port_not_the_public_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The public port does not serve /metrics by default (serve/ingress.py): the banner
    sends the reader to the first replica's own port."""
    monkeypatch.delenv("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", raising=False)
    banner = _banner(Settings(port=8123), None)
    assert "curl http://127.0.0.1:30000/metrics" in banner
    assert "8123/metrics" not in banner
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "31500")
    assert "curl http://127.0.0.1:31500/metrics" in _banner(Settings(port=8123), None)
    opted_in = _banner(Settings(port=8123, public_metrics=True), None)
    assert "http://127.0.0.1:8123/metrics (BATCHSERVE_PUBLIC_METRICS)" in opted_in


def test_the_banner_with_a_tenants_file_says_where_a_token_comes_from() -> None:
    """A tenants file holds only SHA-256 hashes of tokens, so the banner cannot point the
    reader at it for a token: the token is what `batchserve tenants add` printed once."""
    banner = _banner(Settings(port=8123), None)
    assert "Authorization: Bearer <token printed by batchserve tenants add>'" in banner
    assert "api_key=<token printed by batchserve tenants add>" in banner
    assert "tenants file>" not in banner
