"""Calibration: against the mock (its own process), median TTFT (net of the time to first
byte) and per-token ITL within 2% of what the mock was told, at 1 and at 256 streams."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from loadtest import cli
from loadtest.calibrate import calibrate, mock_process
from loadtest.targets import Dialect

TTFT_MS, ITL_MS = 250.0, 50.0
ATTEMPTS = 3  # the machine is shared: a run descheduled by another job is measured again


@pytest.fixture(scope="module")
def mock_url() -> Iterator[str]:
    with mock_process(TTFT_MS, ITL_MS) as url:
        yield url


@pytest.mark.parametrize(("streams", "requests"), [(1, 6), (256, 768)])
def test_calibration_within_two_percent(mock_url: str, streams: int, requests: int) -> None:
    runs: list[dict[str, Any]] = []
    for _ in range(ATTEMPTS):
        c = calibrate(mock_url, streams, requests, TTFT_MS, ITL_MS)
        runs.append(c)
        assert c["errors"] == 0
        if abs(c["ttft_error"]) <= 0.02 and abs(c["itl_error"]) <= 0.02:
            break
    else:
        pytest.fail(f"not within 2% in {ATTEMPTS} runs: {runs}")
    assert c["client_overhead_ttfb_p50_ms"] > 0


def test_cli_calibrates_each_asked_dialect(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[Dialect] = []

    def spy(*args: Any, dialect: Dialect = Dialect.OPENAI_CHAT, **kw: Any) -> dict[str, Any]:
        seen.append(dialect)
        return calibrate(*args, dialect=dialect, **kw)

    monkeypatch.setattr(cli, "calibrate", spy)
    argv = ["calibrate", "--streams", "1", "--ttft-ms", "20", "--itl-ms", "5", "--dialect"]
    assert cli.main([*argv, "workers-ai", "openai-completions"]) == 0
    assert seen == [Dialect.WORKERS_AI, Dialect.OPENAI_COMPLETIONS]
    out = capsys.readouterr().out
    assert "workers-ai    1 streams: errors 0," in out
    assert "openai-completions    1 streams: errors 0," in out
    seen.clear()
    assert cli.main(argv[:-1]) == 0
    assert seen == [Dialect.OPENAI_CHAT]  # the default
