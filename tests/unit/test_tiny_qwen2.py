"""The tiny Qwen2 fixture: builds, tokenizes, renders ChatML, fits vLLM's CPU attention."""

from __future__ import annotations

import json
from pathlib import Path

import transformers

from tests.fixtures.tiny_qwen2 import DEFAULT_SYSTEM_PROMPT, build_tiny_qwen2


def test_fixture_builds_a_complete_checkpoint(tiny_qwen2_dir: Path) -> None:
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (tiny_qwen2_dir / name).is_file(), name


def test_config_shape(tiny_qwen2_dir: Path) -> None:
    config = json.loads((tiny_qwen2_dir / "config.json").read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_qwen2_dir))
    assert config["model_type"] == "qwen2"
    assert config["hidden_size"] // config["num_attention_heads"] >= 64  # CPU attention
    assert config["num_hidden_layers"] == 2
    assert 512 <= config["vocab_size"] <= 1024
    assert config["vocab_size"] >= len(tokenizer)
    assert config["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    generation = json.loads((tiny_qwen2_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"]


def test_tokenizer_round_trips_text(tiny_qwen2_dir: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_qwen2_dir))
    text = "The quick brown fox explained servers to a curious robot, twice: 42!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) > len(text.split())  # words split into several tokens
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    special = tokenizer("<|im_start|>user<|im_end|>", add_special_tokens=False)["input_ids"]
    assert special[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert special[-1] == tokenizer.eos_token_id


def test_chat_template_renders_chatml_with_default_system(tiny_qwen2_dir: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_qwen2_dir))
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    own_system = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        tokenize=False,
    )
    assert own_system == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


def test_model_loads_and_runs(tiny_qwen2_dir: Path) -> None:
    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_dir))
    assert model.dtype == torch.float32
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 7]])).logits
    assert logits.shape == (1, 3, model.config.vocab_size)


def test_build_is_deterministic(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_qwen2(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_qwen2_dir / name).read_bytes(), name
