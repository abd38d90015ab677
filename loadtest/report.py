"""Results on disk: versioned JSON (+ per-request JSONL), a CSV summary, one self-contained
offline HTML report (inline SVG, no scripts, no network), and `compare` for CI gates."""

from __future__ import annotations

import csv
import html
import json
import math
import platform
import sys
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from loadtest.records import RequestResult

SCHEMA = "batchserve-loadtest/1"


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for dist in ("batchserve", "aiohttp", "uvloop"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def result_document(
    config: dict[str, Any],
    summary: dict[str, Any],
    client: dict[str, Any],
    series: list[tuple[float, float]],
    sweep: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        "config": config,
        "summary": summary,
        "client": client,
        "throughput_series": series,
        "sweep": sweep or [],
    }


def write_results(
    path: Path, doc: dict[str, Any], results: Sequence[RequestResult]
) -> tuple[Path, Path, Path]:
    """`path` (JSON), `path`.jsonl (per request), `path`.csv (summary) and `path`.html."""
    path.parent.mkdir(parents=True, exist_ok=True)
    jsonl = path.with_suffix(".requests.jsonl")
    doc = {**doc, "requests_file": jsonl.name}
    path.write_text(dumps(doc, indent=2))
    with jsonl.open("w") as f:
        for r in results:
            f.write(dumps(r.to_json()) + "\n")
    csv_path = path.with_suffix(".csv")
    write_csv(csv_path, doc)
    html_path = path.with_suffix(".html")
    html_path.write_text(render_html(doc, results))
    return jsonl, csv_path, html_path


def check_writable(path: Path) -> None:
    """Fail now, not after a whole run, when results cannot be written at `path`."""
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "is a directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}-"):
            pass
    except OSError as exc:
        raise ValueError(f"--out {path}: cannot write there ({exc.strerror or exc})") from exc


def finite(x: Any) -> Any:
    """`x` with every NaN or infinite float (nested in dicts, lists, tuples) as None: strict
    JSON has neither."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [finite(v) for v in x]
    return x


def dumps(doc: Any, indent: int | None = None) -> str:
    """Strict JSON (non-finite floats as null); other non-JSON values as their str()."""
    return json.dumps(finite(doc), indent=indent, allow_nan=False, default=str)


def load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a {SCHEMA} result")
    return doc


def load_requests(path: Path, doc: dict[str, Any]) -> list[RequestResult]:
    name = doc.get("requests_file")
    if not name or not (path.parent / name).exists():
        return []
    lines = (path.parent / name).read_text().splitlines()
    return [RequestResult.from_json(json.loads(line)) for line in lines if line]


def flat(summary: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in summary.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        elif not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out


def write_csv(path: Path, doc: dict[str, Any]) -> None:
    rows = [{"step": s["label"], **flat(s["summary"])} for s in doc.get("sweep") or []]
    rows = rows or [{"step": "run", **flat(doc["summary"])}]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


# ---- comparison -------------------------------------------------------------------------

COMPARED: tuple[tuple[str, bool], ...] = (
    ("output_token_throughput_tps", True),
    ("request_throughput_rps", True),
    ("ms.ttft.p50", False),
    ("ms.ttft.p99", False),
    ("ms.itl.p50", False),
    ("ms.itl.p99", False),
    ("ms.e2e.p99", False),
    ("error_rate", False),
)
"""(summary key, higher is better)."""


def compare(
    a: dict[str, Any], b: dict[str, Any], max_regression: float
) -> tuple[list[tuple[str, float, float, float, bool]], bool]:
    """Rows (metric, A, B, relative change B vs A, regressed) and whether any regressed by more
    than `max_regression` (a fraction: 0.1 = 10%) in the bad direction."""
    fa, fb = flat(a["summary"]), flat(b["summary"])
    rows, any_bad = [], False
    for key, higher_better in COMPARED:
        va, vb = fa.get(key), fb.get(key)
        if not isinstance(va, int | float) or not isinstance(vb, int | float):
            continue
        change = (0.0 if vb == 0 else math.inf) if va == 0 else (vb - va) / abs(va)
        worse = -change if higher_better else change
        bad = vb - va > max_regression if key == "error_rate" else worse > max_regression
        any_bad |= bad
        rows.append((key, float(va), float(vb), change, bad))
    return rows, any_bad


NOT_WORKLOAD = frozenset(
    {"url", "account", "timeout", "tokenizer", "slo", "delivery_tolerance", "out", "no_progress",
     "workers"}
)  # fmt: skip
"""Config keys that may differ between two runs of the same workload (the server under test,
where results go, how the client reports, how many client processes send it); every other
key shapes the load itself."""


def workload_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """`key: A -> B` for each config key that shapes the load and differs between two result
    documents: their figures then measure different workloads, not a change of the server."""
    ca, cb = a.get("config", {}), b.get("config", {})
    keys = sorted((ca.keys() | cb.keys()) - NOT_WORKLOAD)
    return [f"{k}: {ca.get(k)!r} -> {cb.get(k)!r}" for k in keys if ca.get(k) != cb.get(k)]


def compare_table(rows: list[tuple[str, float, float, float, bool]]) -> str:
    lines = [f"{'metric':<32}{'A':>14}{'B':>14}{'change':>10}  verdict"]
    for key, va, vb, change, bad in rows:
        verdict = "REGRESSION" if bad else "ok"
        lines.append(f"{key:<32}{va:>14.4g}{vb:>14.4g}{change:>+10.1%}  {verdict}")
    return "\n".join(lines)


# ---- HTML -------------------------------------------------------------------------------

W, H, PAD = 640, 260, 48
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


def _scale(lo: float, hi: float, a: float, b: float) -> Any:
    span = (hi - lo) or 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def _axes(xlabel: str, ylabel: str, xr: tuple[float, float], yr: tuple[float, float]) -> str:
    parts = [
        f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - 10}" y2="{H - PAD}" stroke="#333"/>',
        f'<line x1="{PAD}" y1="10" x2="{PAD}" y2="{H - PAD}" stroke="#333"/>',
        f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle">{html.escape(xlabel)}</text>',
        f'<text x="12" y="{H / 2}" transform="rotate(-90 12 {H / 2})" text-anchor="middle">'
        f"{html.escape(ylabel)}</text>",
    ]
    for frac in (0, 0.5, 1):
        xv = xr[0] + (xr[1] - xr[0]) * frac
        yv = yr[0] + (yr[1] - yr[0]) * frac
        x = PAD + (W - 10 - PAD) * frac
        y = H - PAD - (H - PAD - 10) * frac
        parts.append(f'<text x="{x}" y="{H - PAD + 14}" text-anchor="middle">{xv:.3g}</text>')
        parts.append(f'<text x="{PAD - 4}" y="{y + 4}" text-anchor="end">{yv:.3g}</text>')
    return "".join(parts)


def line_chart(
    series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, title: str
) -> str:
    pts = [p for s in series.values() for p in s if math.isfinite(p[1])]
    if not pts:
        return f"<h3>{html.escape(title)}</h3><p>no data</p>"
    xr = (min(p[0] for p in pts), max(p[0] for p in pts))
    yr = (0.0, max(p[1] for p in pts) * 1.05 or 1.0)
    sx, sy = _scale(*xr, PAD, W - 10), _scale(*yr, H - PAD, 10)
    body = [_axes(xlabel, ylabel, xr, yr)]
    for i, (name, s) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s if math.isfinite(y))
        body.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{path}"/>')
        body.append(
            f'<text x="{W - 14}" y="{24 + 14 * i}" text-anchor="end" fill="{c}">'
            f"{html.escape(name)}</text>"
        )
    return _svg(title, body)


def histogram(values: Sequence[float], xlabel: str, title: str, bins: int = 40) -> str:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return f"<h3>{html.escape(title)}</h3><p>no data</p>"
    lo, hi = min(vals), max(vals)
    width = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for v in vals:
        counts[min(int((v - lo) / width), bins - 1)] += 1
    sx, sy = _scale(lo, lo + width * bins, PAD, W - 10), _scale(0, max(counts), H - PAD, 10)
    body = [_axes(xlabel, "requests", (lo, lo + width * bins), (0, max(counts)))]
    for i, c in enumerate(counts):
        x0, x1 = sx(lo + i * width), sx(lo + (i + 1) * width)
        y = sy(c)
        body.append(
            f'<rect x="{x0:.1f}" y="{y:.1f}" width="{max(x1 - x0 - 1, 1):.1f}" '
            f'height="{H - PAD - y:.1f}" fill="{COLORS[0]}"/>'
        )
    return _svg(title, body)


def _svg(title: str, body: list[str]) -> str:
    return (
        f"<h3>{html.escape(title)}</h3>"
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'font-family="sans-serif" font-size="11">{"".join(body)}</svg>'
    )


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows
    )
    return f"<table>{cells}</table>"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def render_html(doc: dict[str, Any], results: Sequence[RequestResult]) -> str:
    ok = [r for r in results if r.ok]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>batchserve load test</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}"
        "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:2px 8px;"
        "text-align:left}</style></head><body>",
        f"<h1>Load test {html.escape(str(doc.get('created', '')))}</h1>",
        "<h2>Configuration</h2>",
        _table(list(flat(doc.get("config", {})).items()) + list(doc.get("versions", {}).items())),
        "<h2>Summary</h2>",
        _table(list(flat(doc["summary"]).items()) + list(flat(doc.get("client", {})).items())),
        "<h2>Latency distributions</h2>",
        histogram([r.ttft_s * 1e3 for r in ok if r.ttft_s is not None], "ms", "TTFT"),
        histogram([x * 1e3 for r in ok for x in r.itl_s], "ms", "per-token ITL"),
        histogram([r.e2e_s * 1e3 for r in ok], "ms", "end-to-end latency"),
        histogram([r.dispatch_lag_s * 1e3 for r in results], "ms", "dispatch lag"),
        "<h2>Throughput over time</h2>",
        line_chart(
            {"output tokens/s": [tuple(p) for p in doc.get("throughput_series", [])]},
            "s",
            "tokens/s",
            "output token throughput",
        ),
    ]
    sweep = doc.get("sweep") or []
    if sweep:
        rate = [(s["summary"].get("request_throughput_rps", math.nan), s) for s in sweep]
        rate.sort(key=lambda t: t[0])

        def pick(key: str) -> list[tuple[float, float]]:
            return [(x, s["summary"]["ms"]["ttft"].get(key, math.nan)) for x, s in rate]

        parts.append("<h2>Sweep</h2>")
        parts.append(
            line_chart(
                {"TTFT p50": pick("p50"), "TTFT p99": pick("p99")},
                "achieved req/s",
                "ms",
                "TTFT vs load",
            )
        )
        parts.append(
            _table([(s["label"], s["summary"].get("output_token_throughput_tps")) for s in sweep])
        )
    parts.append("</body></html>")
    return "\n".join(parts)
