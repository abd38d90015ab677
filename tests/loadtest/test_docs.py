"""The load tester's documented commands work when pasted into a shell."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from loadtest.cli import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def _loadtest_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    return [line for line in text.splitlines() if line.startswith("batchserve-loadtest ")]


def test_readme_load_test_examples_have_no_stray_redirections() -> None:
    commands = _loadtest_commands()
    assert any("--slo" in c for c in commands)
    for command in commands:
        lexer = shlex.shlex(command.split("#")[0], posix=True, punctuation_chars=True)
        tokens = list(lexer)
        # an unquoted < or > would make the shell redirect instead of passing the SLO
        assert not {"<", ">", "<=", ">="} & set(tokens), command
        for i, tok in enumerate(tokens[:-1]):
            if tok == "--slo":
                assert "<=" in tokens[i + 1], command


def test_help_quotes_the_slo_example(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    assert "'ttft:p99<=500'" in " ".join(capsys.readouterr().out.split())
