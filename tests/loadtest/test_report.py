from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from loadtest import report
from loadtest.cli import main
from loadtest.metrics import summarize, throughput_series
from tests.loadtest.test_metrics import result


def write(tmp_path: Path, name: str, ttft: float, sweep: bool = False) -> Path:
    rs = [result(i, sent=i * 0.1, ttft=ttft, chunks=[ttft, ttft + 0.05]) for i in range(20)]
    summary = summarize(rs)
    steps = (
        [{"label": "synchronous", "load": "c1", "rate": None, "summary": summary}] * 2
        if sweep
        else None
    )
    doc = report.result_document({"url": "x"}, summary, {"client_bound": False},
                                 throughput_series(rs), steps)  # fmt: skip
    path = tmp_path / f"{name}.json"
    report.write_results(path, doc, rs)
    return path


def test_results_files_and_offline_html(tmp_path: Path) -> None:
    path = write(tmp_path, "a", 0.1, sweep=True)
    doc = report.load(path)
    assert doc["schema"] == report.SCHEMA and "aiohttp" in doc["versions"]
    assert len(report.load_requests(path, doc)) == 20
    assert path.with_suffix(".csv").read_text().startswith("step,")
    page = path.with_suffix(".html").read_text()
    assert page.count("<svg") >= 6  # 4 histograms, throughput, TTFT vs load
    assert "TTFT vs load" in page
    # self-contained: no scripts, stylesheets or images fetched from anywhere
    assert "<script" not in page and "<link" not in page
    assert set(re.findall(r"https?://[^\"'<> ]+", page)) <= {"http://www.w3.org/2000/svg"}


def test_compare_exits_non_zero_on_regression(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = write(tmp_path, "a", 0.1), write(tmp_path, "b", 0.2)
    assert main(["compare", str(a), str(a)]) == 0
    assert main(["compare", str(a), str(b), "--max-regression", "0.1"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"ms\.ttft\.p50 .* REGRESSION", out)
    assert main(["compare", str(b), str(a)]) == 0  # faster is no regression
    assert main(["report", str(a)]) == 0


def test_load_rejects_foreign_json(tmp_path: Path) -> None:
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"schema": "other"}))
    with pytest.raises(ValueError):
        report.load(p)


def test_compare_warns_when_the_runs_had_different_workloads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A regression gate between two different loads measures the loads, not the server:
    `compare` says which config keys differ (the server's URL and output paths may)."""
    a, b = write(tmp_path, "a", 0.1), write(tmp_path, "b", 0.1)
    same = {"url": "http://a", "dialect": "workers-ai", "rate": 4.0, "out": "runs/a.json"}
    for path, cfg in (
        (a, same),
        (b, {**same, "url": "http://b", "dialect": "openai-chat", "out": "runs/b.json"}),
    ):
        doc = report.load(path)
        path.write_text(json.dumps({**doc, "config": cfg}))
    assert main(["compare", str(a), str(a)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["compare", str(a), str(b)]) == 0
    err = capsys.readouterr().err
    assert "different workloads" in err and "dialect: 'workers-ai' -> 'openai-chat'" in err
    assert "url" not in err and "out:" not in err
