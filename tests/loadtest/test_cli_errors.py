"""The CLI's failure paths: errors counted by cause, a distinct exit code when nothing
succeeded, and one-line messages (never tracebacks) for bad input."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from loadtest.cli import EXIT_NO_SUCCESS, EXIT_USAGE, main
from loadtest.metrics import error_cause, errors_by_cause, summarize
from loadtest.mock import MockConfig
from tests.loadtest.conftest import MockFactory
from tests.loadtest.test_metrics import result


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_error_causes() -> None:
    assert error_cause(result(0)) is None
    assert error_cause(result(0, error="HTTP 401: no", status=401)) == "401"
    refused = "ClientConnectorError: Cannot connect to host 127.0.0.1:1"
    assert error_cause(result(0, error=refused, status=None)) == "connect"
    assert error_cause(result(0, error="TimeoutError: ", status=None)) == "timeout"
    assert error_cause(result(0, error="ServerDisconnectedError: x", status=None)) == (
        "disconnected"
    )
    assert error_cause(result(0, error="stream ended without [DONE]")) == "incomplete"
    assert error_cause(result(0, error="model overloaded")) == "body"
    rs = [result(i, error="HTTP 401: no", status=401) for i in range(3)]
    rs += [result(9, error="HTTP 503: busy", status=503), result(10)]
    assert errors_by_cause(rs) == {"401": 3, "503": 1}
    assert summarize(rs)["errors_by_cause"] == {"401": 3, "503": 1}
    assert summarize([result(0)])["errors_by_cause"] == {}


def test_server_down_exits_non_zero_with_the_cause(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r.json"
    url = f"http://127.0.0.1:{_closed_port()}"
    args = ["run", "--url", url, "-n", "4", "--token", "x", "--no-progress", "--out", str(out)]
    assert main(args) == EXIT_NO_SUCCESS
    cap = capsys.readouterr()
    assert "0/4 ok" in cap.out and "errors 4 (connect: 4)" in cap.out
    assert "no request succeeded (connect: 4)" in cap.err
    doc = json.loads(out.read_text())
    assert doc["summary"]["errors_by_cause"] == {"connect": 4}
    assert "errors_by_cause.connect" in out.with_suffix(".csv").read_text()
    assert "errors_by_cause.connect" in out.with_suffix(".html").read_text()


def test_every_request_refused_exits_non_zero(
    mock_server: MockFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    url = mock_server(MockConfig(ttft_s=0.01, itl_s=0.001, rate_limit_every=1))
    args = ["run", "--url", url, "--dialect", "openai-chat", "-n", "3", "--no-progress"]
    assert main(args) == EXIT_NO_SUCCESS
    assert "errors 3 (429: 3), 429 refused in p99" in capsys.readouterr().out


def test_partial_success_exits_zero(
    mock_server: MockFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    url = mock_server(MockConfig(ttft_s=0.01, itl_s=0.001, rate_limit_every=2))
    args = ["run", "--url", url, "--dialect", "openai-chat", "-n", "4", "--concurrency", "1"]
    assert main([*args, "--no-progress"]) == 0
    assert "2/4 ok" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args",
    [
        ["compare", "{tmp}/missing.json", "{tmp}/b.json"],
        ["report", "{tmp}/missing.json"],
        ["run", "--tokenizer", "{tmp}/nonexistent"],
        ["run", "--tokenizer", "{tmp}"],  # a directory without tokenizer files
        ["run", "--workload", "sharegpt", "--dataset", "{tmp}/nonexistent.json"],
        ["run", "--workload", "sharegpt", "--dataset", "{tmp}/not-json.json"],
        ["run", "--out", "{tmp}/a-file/r.json"],  # its parent is a file
        ["run", "--out", "{tmp}"],  # a directory
        ["sweep", "--out", "{tmp}/a-file/r.json"],
    ],
)
def test_bad_input_is_one_line_and_the_usage_code(
    args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "not-json.json").write_text("{")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if argv[0] in ("run", "sweep"):
        argv += ["--url", f"http://127.0.0.1:{_closed_port()}", "-n", "2", "--no-progress"]
    assert main(argv) == EXIT_USAGE
    cap = capsys.readouterr()
    assert cap.err.startswith("batchserve-loadtest: ") and cap.err.count("\n") == 1
    assert " ok, " not in cap.out  # nothing was run (--out is checked before the run)


def test_ramp_refuses_n_and_sends_its_own_count(
    mock_server: MockFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = mock_server(MockConfig(ttft_s=0.01, itl_s=0.001))
    args = ["run", "--url", url, "--dialect", "openai-chat", "--no-progress", "--ramp", "2", "4"]
    assert main([*args, "1", "-n", "12"]) == EXIT_USAGE
    assert "--ramp FROM TO SECONDS sends (FROM+TO)/2*SECONDS requests" in capsys.readouterr().err
    out = tmp_path / "r.json"
    assert main([*args, "1", "--out", str(out)]) == 0
    assert "3/3 ok" in capsys.readouterr().out  # (2 + 4) / 2 * 1 s
    assert json.loads(out.read_text())["config"]["num_requests"] == 3
