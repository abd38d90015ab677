"""Render the Helm chart with the real Helm SDK (helm-python-sdk), and keep
deploy/serve-config.yaml generated from it.

`python -m tests.chart.render --write` (what `make chart-sync` runs) rewrites
deploy/serve-config.yaml from the chart's default values; the chart tests fail
when the committed file differs from what this renders.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "helm" / "batchserve"
PROFILES = {
    "default": None,
    "gpu": ROOT / "helm" / "values-gpu.yaml",
    "cpu": ROOT / "helm" / "values-cpu.yaml",
}
SERVE_CONFIG = ROOT / "deploy" / "serve-config.yaml"
RELEASE = "batchserve"
NAMESPACE = "llm"

SERVE_CONFIG_HEADER = """\
# GENERATED from helm/batchserve/values.yaml by `make chart-sync` -- do not edit by hand.
# It is the chart's serveConfigV2 with default values; tests/chart fails when the two differ.
#
# On a running Ray cluster (every node started with RAY_SERVE_ENABLE_HA_PROXY=1):
#   serve deploy deploy/serve-config.yaml     # or: serve run deploy/serve-config.yaml
# `args` are serve/settings.py Settings fields; the paths are those of the images in deploy/
# (model cache at /models, tenants file mounted under /etc/batchserve/tenants).
# The chart's own Redis is not in `args`: its pods get BATCHSERVE_REDIS_URL (with the password)
# from a Secret. Set that variable on every node (or add `redis_url`) for several replicas.
# HAProxy's load-shedding limits in the images are those of the default settings, which these
# args keep; the chart sets BATCHSERVE_HAPROXY_SERVER_MAXCONN and BATCHSERVE_HAPROXY_TENANT_MAXCONN
# on every node from its values (0: no limit). Set them likewise when you change the args;
# for `stream_stall_s`, set BATCHSERVE_STREAM_STALL_S and RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S
# (whole seconds) to it on every node (the images have 30, the default). The images' HAProxy
# answers /metrics 404/7003 on the Serve port (Prometheus scrapes each replica's own port):
# with `public_metrics: true`, set BATCHSERVE_HAPROXY_PUBLIC_METRICS=true on every node too.
"""


def profile_values(profile: str) -> dict[str, Any]:
    path = PROFILES[profile]
    if path is None:
        return {}
    loaded: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    return loaded


def render(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered text (schema-validated by Helm first)."""
    # Helm logs symlinked files at INFO; forward only warnings, into Python logging.
    helm.enable_logging(logging.WARNING, logging.getLogger("helm"))
    with helm.Chart.load(CHART_DIR) as chart:
        return chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)


def documents(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every rendered Kubernetes object (NOTES.txt excluded)."""
    docs: list[dict[str, Any]] = []
    for name, text in sorted(render(values).items()):
        if name.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def rayservice(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == "RayService"]
    return found


def serve_config_text(values: dict[str, Any] | None = None) -> str:
    """The chart's serveConfigV2 as the deploy file holds it."""
    body = rayservice(documents(values))["spec"]["serveConfigV2"]
    return SERVE_CONFIG_HEADER + str(body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="rewrite deploy/serve-config.yaml")
    ns = parser.parse_args(argv)
    text = serve_config_text()
    if ns.write:
        SERVE_CONFIG.write_text(text)
        print(f"wrote {SERVE_CONFIG.relative_to(ROOT)}")
        return 0
    if SERVE_CONFIG.read_text() != text:
        print(f"{SERVE_CONFIG.relative_to(ROOT)} is stale: run `make chart-sync`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
