"""The vocabulary a token-id prompt is checked against, as vLLM's own check counts it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from serve.replica.vllm_engine import _vocab_size


@pytest.mark.parametrize(
    ("max_token_id", "model_vocab", "expected"),
    [
        (151645, 151936, 151936),  # Qwen: the embedding is padded past the tokenizer
        (49152, 49152, 49153),  # added tokens past the model's vocabulary
    ],
)
def test_vocab_size_is_the_larger_of_tokenizer_and_model(
    max_token_id: int, model_vocab: int, expected: int
) -> None:
    tokenizer = SimpleNamespace(max_token_id=max_token_id)
    model_config = SimpleNamespace(get_vocab_size=lambda: model_vocab)
    assert _vocab_size(tokenizer, model_config) == expected
