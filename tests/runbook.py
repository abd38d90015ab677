"""RUNBOOK.md and the anchors GitHub gives its headings: what each alert's `runbook_url`
annotation points at (deploy/prometheus/rules/*.yml, the chart's PrometheusRule)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RUNBOOK = ROOT / "RUNBOOK.md"

_FENCE = re.compile(r"^(```|~~~)")
_HEADING = re.compile(r"^#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
# github-slugger: what is not a letter, digit, mark, `_`, `-` or a space is dropped.
_DROPPED = re.compile(r"[^\w\- ]", re.UNICODE)


def chart_runbook_base_url() -> str:
    """The chart's default monitoring.prometheusRule.runbookBaseUrl (the rule files carry
    it too, so the rendered PrometheusRule equals them with the default values)."""
    values = yaml.safe_load((ROOT / "helm" / "batchserve" / "values.yaml").read_text())
    base: str = values["monitoring"]["prometheusRule"]["runbookBaseUrl"]
    return base


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading's text (before de-duplication)."""
    text = _LINK.sub(r"\1", heading).strip().lower()
    return _DROPPED.sub("", text).replace(" ", "-")


def anchors(markdown: str) -> list[str]:
    """The anchors of every heading outside code blocks, in order; a repeated one gets
    `-1`, `-2`, ... as on GitHub."""
    found: list[str] = []
    seen: dict[str, int] = {}
    fenced = False
    for line in markdown.splitlines():
        if _FENCE.match(line.strip()):
            fenced = not fenced
            continue
        match = None if fenced else _HEADING.match(line)
        if match is None:
            continue
        anchor = github_anchor(match[1])
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        found.append(anchor if count == 0 else f"{anchor}-{count}")
    return found


def runbook_anchors() -> set[str]:
    return set(anchors(RUNBOOK.read_text()))
