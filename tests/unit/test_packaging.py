"""pyproject.toml builds without setuptools' deprecation of a `project.license` table."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_the_license_is_an_spdx_expression_setuptools_can_read() -> None:
    """setuptools warns on every build (`make serve`'s first run prints it three times) that
    a `license = {text = ...}` table stops building after 2027-02-18; an SPDX string needs
    setuptools 77 or later in the build requirements."""
    data = tomllib.loads(PYPROJECT.read_text())
    assert isinstance(data["project"]["license"], str)
    (setuptools,) = [r for r in data["build-system"]["requires"] if r.startswith("setuptools")]
    match = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", setuptools)
    assert match is not None and int(match.group(1)) >= 77, setuptools
