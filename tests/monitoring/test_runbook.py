"""RUNBOOK.md: every alert links its own section, and the section is there."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.prometheus_server import alert_rules, tool
from tests.runbook import (
    RUNBOOK,
    anchors,
    chart_runbook_base_url,
    github_anchor,
    runbook_anchors,
)


@pytest.mark.parametrize(
    ("markdown", "expected"),
    [
        ("## BatchserveKVCacheNearFull", ["batchservekvcachenearfull"]),
        ("## Finding your way around", ["finding-your-way-around"]),
        ("### `up == 0`: a down target!", ["up--0-a-down-target"]),
        ("## [Redis](https://redis.io) and the ledger ##", ["redis-and-the-ledger"]),
        ("## A\n## A\n## A", ["a", "a-1", "a-2"]),
        ("```sh\n# not a heading\n```\n# Title", ["title"]),
        ("#hashtag, no space", []),
    ],
)
def test_anchors_are_githubs(markdown: str, expected: list[str]) -> None:
    assert anchors(markdown) == expected


def test_every_alert_links_its_own_runbook_section() -> None:
    """An alert added without a `runbook_url`, or without its `## AlertName` section in
    RUNBOOK.md, fails here. The URL is the chart's default base (the PrometheusRule swaps
    in monitoring.prometheusRule.runbookBaseUrl) plus the anchor of the alert's name."""
    base = chart_runbook_base_url()
    assert base.endswith("/RUNBOOK.md")
    sections = runbook_anchors()
    for rule in alert_rules():
        name = rule["alert"]
        url = rule.get("annotations", {}).get("runbook_url")
        assert url == f"{base}#{github_anchor(name)}", f"{name}: runbook_url {url!r}"
        assert github_anchor(name) in sections, f"{name}: no '## {name}' section in RUNBOOK.md"


def test_runbook_has_no_section_for_an_alert_that_does_not_exist() -> None:
    """A renamed or removed alert leaves no stale section behind."""
    alerts = {rule["alert"] for rule in alert_rules()}
    sections = set(re.findall(r"^## (Batchserve\w+)[ \t]*$", RUNBOOK.read_text(), re.MULTILINE))
    assert sections, "no alert sections in RUNBOOK.md"
    assert sections == alerts, sections ^ alerts


def test_runbook_links_within_itself_resolve() -> None:
    text = RUNBOOK.read_text()
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links, "expected cross-references between sections"
    assert links <= runbook_anchors(), links - runbook_anchors()


def test_runbook_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every line of the runbook's ```promql blocks parses (promtool checks each as the
    expression of a recording rule)."""
    blocks = re.findall(r"^```promql\n(.*?)^```", RUNBOOK.read_text(), re.MULTILINE | re.DOTALL)
    queries = [line for block in blocks for line in block.splitlines() if line.strip()]
    assert len(queries) >= 10
    rules = [{"record": f"runbook:query_{i}", "expr": q} for i, q in enumerate(queries)]
    path = tmp_path / "runbook.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "runbook", "rules": rules}]}))
    done = subprocess.run(
        [tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
