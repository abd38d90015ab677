"""No NaN anywhere: percentiles of infinities (errors in SLO checks) and result files that are
strict JSON."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path
from typing import Any

import pytest

from loadtest import report
from loadtest.cli import EXIT_NO_SUCCESS, main
from loadtest.metrics import Slo, percentile, summarize, throughput_series
from tests.loadtest.test_metrics import result


def _strict(text: str) -> Any:
    def reject(name: str) -> None:
        raise AssertionError(f"{name} in the JSON")

    return json.loads(text, parse_constant=reject)


def _no_nan(x: Any) -> None:
    if isinstance(x, float):
        assert not math.isnan(x)
    elif isinstance(x, dict):
        for v in x.values():
            _no_nan(v)
    elif isinstance(x, list | tuple):
        for v in x:
            _no_nan(v)


def test_percentile_of_infinities_is_infinite() -> None:
    inf = math.inf
    assert percentile([inf, inf, inf], 99) == inf
    assert percentile([inf, inf], 50) == inf
    assert percentile([1.0, inf], 0) == 1.0  # no 0 * inf
    assert percentile([1.0, inf], 50) == inf
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5


def test_slo_check_of_an_all_error_run_is_missed_not_nan() -> None:
    errors = [result(i, error="HTTP 503: busy", status=503, chunks=[]) for i in range(4)]
    slos = [Slo.parse("ttft:p99<=500"), Slo.parse("itl:p50<=50"), Slo.parse("e2e:p90<=900")]
    s = summarize(errors, slos)
    gp = s["goodput"]
    assert gp["met"] is False
    assert all(v == math.inf for v in gp["run_values_ms"].values())
    _no_nan(s)


def test_result_files_are_strict_json(tmp_path: Path) -> None:
    rs = [result(i, error="HTTP 503: busy", status=503, chunks=[]) for i in range(3)]
    s = summarize(rs, [Slo.parse("ttft:p99<=500")])
    assert s["output_length"]["realised_mean"] is None  # no successful request
    assert s["goodput"]["run_values_ms"] == {"ttft:p99<=500ms": math.inf}
    doc = report.result_document({"url": "x"}, s, {}, throughput_series(rs))
    path = tmp_path / "r.json"
    report.write_results(path, doc, rs)
    loaded = _strict(path.read_text())
    assert loaded["summary"]["output_length"]["realised_mean"] is None
    assert loaded["summary"]["goodput"]["run_values_ms"] == {"ttft:p99<=500ms": None}
    for line in path.with_suffix(".requests.jsonl").read_text().splitlines():
        _strict(line)
    assert report.load(path)["summary"]["goodput"]["met"] is False


def test_cli_prints_an_infinite_slo_value_sensibly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "r.json"
    args = ["run", "--url", f"http://127.0.0.1:{port}", "-n", "2", "--no-progress"]
    assert main([*args, "--slo", "ttft:p99<=500", "--out", str(out)]) == EXIT_NO_SUCCESS
    text = capsys.readouterr().out
    assert "SLOs MISSED: ttft:p99<=500ms -> inf (errors count as infinite)" in text
    assert "nan" not in text.lower()
    _strict(out.read_text())
