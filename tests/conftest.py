"""Session-wide fixtures shared by every test tier."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.tiny_qwen2 import build_tiny_qwen2


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Qwen2 checkpoint (ChatML tokenizer), built once per session."""
    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))
