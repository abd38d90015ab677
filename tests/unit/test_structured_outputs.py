"""`response_format`: what the replica hands vLLM, and what vLLM's xgrammar backend then
allows. vLLM takes "no whitespace in JSON" only from the engine's configuration; a
request's own `disable_any_whitespace` is ignored (a json_object reply once read
`{\\n  "The River of Life"\\n\\n:\\n\\n{…`)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import transformers

from serve.replica.engine import SamplingOptions
from serve.replica.vllm_engine import _engine_args, _sampling_params
from serve.settings import cpu_catalog

# xgrammar 0.2.8 wants exactly one space after a comma in some places (vLLM's FIXME in
# its backend_xgrammar.py, xgrammar issue 945): never more, so it cannot run on either.
COMPACT = '{"a":{"b":[1]}}'
SPACED = ('{\n  "a"', '{"a" :', '{"a": {', '{"a":\n{', '{"a":{"b":[\n', '{"a":[1,  ', '{"a":[1,\n')


def xgrammar_matcher(tiny_qwen2_dir: Path, structured_outputs_config: Any, kind: str) -> Any:
    """The grammar matcher vLLM's xgrammar backend builds for a `kind` request on an
    engine configured with `structured_outputs_config` (as the EngineCore does)."""
    from vllm.v1.structured_output.backend_types import StructuredOutputOptions
    from vllm.v1.structured_output.backend_xgrammar import XgrammarBackend

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_qwen2_dir))
    config = SimpleNamespace(
        structured_outputs_config=structured_outputs_config,
        model_config=None,
        speculative_config=None,
    )
    backend = XgrammarBackend(
        vllm_config=config,  # type: ignore[arg-type]
        tokenizer=tokenizer,
        vocab_size=len(tokenizer),
    )
    if kind == "json_object":
        return backend.compile_grammar(StructuredOutputOptions.JSON_OBJECT, "").matcher
    schema = '{"type": "object", "properties": {"a": {"type": "object"}, "c": {"type": "integer"}}}'
    return backend.compile_grammar(StructuredOutputOptions.JSON, schema).matcher


@pytest.mark.parametrize("kind", ["json_object", "json_schema"])
def test_engine_config_makes_json_compact(tiny_qwen2_dir: Path, kind: str) -> None:
    args = _engine_args(cpu_catalog(str(tiny_qwen2_dir))[0])
    config = args.structured_outputs_config
    assert config.disable_any_whitespace and config.backend == "xgrammar"
    for spaced in SPACED:
        matcher = xgrammar_matcher(tiny_qwen2_dir, config, kind)
        assert not matcher.accept_string(spaced), spaced
    matcher = xgrammar_matcher(tiny_qwen2_dir, config, kind)
    assert matcher.accept_string(COMPACT)
    # vLLM's default engine configuration: whitespace anywhere, whatever the request says.
    from vllm.config import StructuredOutputsConfig

    loose = xgrammar_matcher(tiny_qwen2_dir, StructuredOutputsConfig(), kind)
    assert loose.accept_string(SPACED[0] + " :\n\n{")


def test_sampling_params_carry_the_constraint() -> None:
    base = SamplingOptions(max_tokens=8, temperature=0.0)
    assert _sampling_params(base).structured_outputs is None
    obj = _sampling_params(SamplingOptions(max_tokens=8, temperature=0.0, json_object=True))
    assert obj.structured_outputs.json_object is True
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    params = _sampling_params(SamplingOptions(max_tokens=8, temperature=0.0, json_schema=schema))
    assert params.structured_outputs.json == schema
    assert params.structured_outputs.json_object is None
