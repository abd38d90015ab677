"""Typed configuration: the only module that reads the environment.

Everything is a pydantic model so the driver can read the environment once
(`Settings()`), hand `settings.model_dump()` to Ray, and every replica rebuilds
exactly the same object from it (`Settings.model_validate(...)`) without
looking at its own environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

QWEN_API_NAME = "@cf/qwen/qwen1.5-1.8b-chat"
STREAM_STALL_S = 30.0
EMBEDDED_WEIGHTS_LABEL = "SmolLM2-135M-Instruct (embedded CPU stand-in, not Qwen1.5)"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "batchserve"


class EngineArgs(BaseModel):
    """The subset of vLLM engine arguments an operator tunes per model."""

    model_config = ConfigDict(extra="forbid")

    dtype: str = "auto"
    max_model_len: int | None = Field(default=None, ge=16)
    max_num_seqs: int = Field(default=256, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    tensor_parallel_size: int = Field(default=1, ge=1)
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    # None: off on the CPU backend (see `serve.replica.vllm_engine`), vLLM's default (on)
    # elsewhere. Off, every prompt is prefilled in one step (vLLM then raises
    # max_num_batched_tokens to at least max_model_len).
    enable_chunked_prefill: bool | None = None
    seed: int = 0


class ModelSpec(BaseModel):
    """One catalog entry: the API model name and what serves it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="API model name, e.g. @cf/qwen/qwen1.5-1.8b-chat")
    weights: str = Field(description="Hugging Face id or local checkpoint directory")
    weights_label: str = Field(default="", description="Human description of the weights")
    context_window: int = Field(ge=16, description="prompt + max_tokens limit in tokens")
    engine: EngineArgs = Field(default_factory=EngineArgs)
    replicas: int = Field(default=1, ge=1)
    # Resources one replica asks Ray for (GPUs in production, CPUs locally).
    num_gpus: float = Field(default=1.0, ge=0.0)
    num_cpus: float = Field(default=1.0, ge=0.0)

    @property
    def described_weights(self) -> str:
        return self.weights_label or self.weights


def gpu_catalog() -> list[ModelSpec]:
    return [
        ModelSpec(
            name=QWEN_API_NAME,
            weights="Qwen/Qwen1.5-1.8B-Chat",
            weights_label="Qwen/Qwen1.5-1.8B-Chat",
            context_window=32000,
            engine=EngineArgs(dtype="auto", max_model_len=32768),
        )
    ]


def cpu_catalog(weights: str, *, embedded: bool = True) -> list[ModelSpec]:
    """The local profile: the same API name served on the CPU.

    With the embedded SmolLM2 weights (8192-token context) by default; other
    weights keep their own context length (vLLM derives it from their config).
    """
    return [
        ModelSpec(
            name=QWEN_API_NAME,
            weights=weights,
            weights_label=EMBEDDED_WEIGHTS_LABEL if embedded else "",
            context_window=8192 if embedded else 32000,
            engine=EngineArgs(
                dtype="float32",
                max_model_len=8192 if embedded else None,
                max_num_seqs=64,
                enforce_eager=True,
            ),
            num_gpus=0.0,
            num_cpus=0.0,
        )
    ]


class DevTenant(BaseModel):
    """The tenant `batchserve up` creates when no tenants file is given.

    Only the SHA-256 of the token travels to the replicas.
    """

    model_config = ConfigDict(extra="forbid")

    tenant_id: str = "dev"
    account_id: str = "dev-account"
    token_sha256: str


class Settings(BaseSettings):
    """batchserve configuration (environment prefix ``BATCHSERVE_``).

    Nested values use ``__`` (``BATCHSERVE_MODELS='[...]'`` takes JSON).
    """

    model_config = SettingsConfigDict(
        env_prefix="BATCHSERVE_", env_nested_delimiter="__", extra="forbid"
    )

    profile: Literal["gpu", "cpu"] = "gpu"
    models: list[ModelSpec] = Field(default_factory=gpu_catalog)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    cache_dir: Path = Field(default_factory=default_cache_dir)
    # `batchserve up` only: the port Ray exports its own metrics on (ray_serve_*, Ray
    # core), the one deploy/prometheus/prometheus.yml scrapes and KubeRay pods use.
    # 0, or the port already taken: Ray picks one.
    ray_metrics_export_port: int = Field(default=8080, ge=0, le=65535)

    # Workers AI defaults and caps.
    default_max_tokens: int = Field(default=256, ge=1)
    default_temperature: float = Field(default=0.6, ge=0.0, le=5.0)
    non_stream_max_tokens: int = Field(default=1024, ge=1)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # Special tokens (e.g. <|im_start|>) inside non-raw message content are plain text,
    # so a user cannot forge a system turn; `raw: true` prompts keep full control.
    chat_content_as_text: bool = True
    # Workers AI streams: a random-length `p` field in every event (Cloudflare's mitigation
    # of the token-length side channel), and `:` comments while no token has come yet.
    stream_padding: bool = False
    stream_heartbeat_s: float = Field(default=15.0, gt=0)

    # Engine admission: requests beyond this many in flight per replica get 429/3040.
    max_inflight_per_replica: int = Field(default=256, ge=1)
    # Reliability (issue 9): a generation running longer than this is aborted with 408/3007;
    # a replica whose engine holds unfinished requests but produced nothing for
    # `engine_stall_s` (on the CPU backend: nor used half a core, as one long prefill
    # step does) fails Serve's health check; a stream whose client has not taken
    # a frame for `stream_stall_s` is aborted (the engine request is freed).
    request_timeout_s: float = Field(default=300.0, gt=0)
    engine_stall_s: float = Field(default=60.0, gt=0)
    stream_stall_s: float = Field(default=STREAM_STALL_S, gt=0)
    retry_after_seconds: int = Field(default=1, ge=1)
    # Slow clients: a request body not fully received this long after the handler starts
    # reading it is answered 408/3007 (HAProxy's `timeout http-request` covers headers).
    body_timeout_s: float = Field(default=60.0, gt=0)
    # Request headers not complete within this many seconds close the connection
    # (slowloris): at the ingress (HAProxy's `timeout http-request`, which `batchserve up`
    # and the images apply; serve/ingress.py) and on each replica's own port, with
    # 408/3007 (serve/gateway/header_deadline.py).
    http_request_timeout_s: int = Field(default=10, ge=1)
    # A replica whose process dies still answers its clients: a keeper process writes the
    # error event and [DONE] on its streams, 502/3008 where nothing was sent yet
    # (serve/gateway/last_words.py).
    replica_last_words: bool = True
    # KV cache for vLLM's CPU backend, GiB (VLLM_CPU_KVCACHE_SPACE).
    cpu_kv_cache_gib: int = Field(default=2, ge=1)
    # Ray Serve health check cadence for replicas.
    health_check_period_s: float = Field(default=10.0, gt=0)
    health_check_timeout_s: float = Field(default=30.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(default=30.0, ge=0)
    # A draining replica polls its own /-/healthz this often (0: never) and ends the
    # generations still running 1 s before graceful_shutdown_timeout_s runs out, with
    # 503/3040, instead of leaving them to be cut (serve/replica/drain.py).
    drain_poll_s: float = Field(default=1.0, ge=0)

    # Observability: one JSON access log line per request (logger `batchserve.access`);
    # `log_prompts` (debug only) adds prompt token ids and generated text to it.
    access_log: bool = True
    log_prompts: bool = False
    # Each replica's `/metrics` (plan names, per-plan traffic and tokens, replica ids, vLLM
    # internals) is for Prometheus, which scrapes each replica's own port. False: the
    # public port (HAProxy) answers `/metrics` and anything under it with the 404/7003 of an
    # unknown route (serve/ingress.py); true: it passes `/metrics` to one replica as before.
    public_metrics: bool = False
    # OpenTelemetry: OTLP/HTTP traces endpoint (e.g. http://collector:4318/v1/traces).
    # Unset = tracing off. Set, every request gets a gateway span and vLLM's engine
    # spans nest under it.
    otel_traces_endpoint: str | None = None

    tenants_file: Path | None = None
    # Shared tenant state (rate limits, usage) once there is more than one replica, e.g.
    # redis://host:6379/0; None keeps it in the replica's memory. The Helm chart sets it.
    redis_url: str | None = None
    # Tenant limits (issue 5). Redis down: admit without counting (fail open) or answer
    # 503 (fail closed); either way logged and counted in batchserve_ratelimit_errors_total.
    rate_limit_fail_open: bool = True
    redis_timeout_s: float = Field(default=0.25, gt=0)
    # Fair sharing: requests wait in a bounded per-tenant queue when the replica is full.
    queue_max_per_tenant: int = Field(default=64, ge=0)
    queue_max_wait_s: float = Field(default=30.0, gt=0)
    # All tenants together: requests waiting in one replica's fair queue. Beyond it a
    # request that cannot start at once is refused at once (429/3040), so a burst's
    # excess costs milliseconds and memory stays bounded however many tenants burst.
    queue_max_total: int = Field(default=256, ge=0)
    # Load shedding at the ingress: HAProxy hands one replica at most engine slots +
    # queue_max_total + this many requests at once, and one tenant at most what a replica
    # can run or queue for it + this many per replica up, and answers the rest 429/3040
    # itself, in well under a millisecond, so a flood beyond what the replicas can queue
    # never costs them the ~2 ms of CPU a refusal takes there (serve/ingress.py). The
    # headroom is for requests being refused, health and model listings.
    ingress_shedding: bool = True
    ingress_headroom: int = Field(default=16, ge=0)
    # Slots one tenant alone can never fill, so another tenant's first request starts at
    # once during a flood (its time to first token stays near the idle figure). None:
    # one in 16 of the replica's engine slots (0 below 16 slots).
    queue_reserved_slots: int | None = Field(default=None, ge=0)
    # Usage ledger without Redis: SQLite (WAL); default cache_dir/usage.sqlite3. With Redis:
    # the fallback of an outage (default cache_dir/usage-fallback.sqlite3), handed on after.
    usage_ledger_path: Path | None = None
    # Write-ahead usage entries (serve/gateway/ledger.py): each replica's ledger refreshes a
    # heartbeat this often; one silent for `usage_owner_dead_after_s` is dead and its
    # requests in flight are recorded as error/replica_lost by a live replica's sweep,
    # run every `usage_sweep_s`.
    usage_heartbeat_s: float = Field(default=2.0, gt=0)
    usage_owner_dead_after_s: float = Field(default=10.0, gt=0)
    usage_sweep_s: float = Field(default=5.0, gt=0)
    # How often the tenants file is checked for changes.
    tenants_reload_s: float = Field(default=1.0, ge=0)
    dev_tenant: DevTenant | None = None
    # `batchserve up` only: a fixed dev token instead of the generated one. Never
    # sent to replicas (only its hash is, inside `dev_tenant`).
    dev_token: SecretStr | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _models_unique(self) -> Settings:
        names = [m.name for m in self.models]
        if len(names) != len(set(names)):
            raise ValueError("model names in the catalog must be unique")
        if not names:
            raise ValueError("the model catalog is empty")
        return self

    @model_validator(mode="after")
    def _stall_seen_before_timeout(self) -> Settings:
        # Timed-out requests are aborted, after which a stopped engine looks idle: the
        # watchdog must be able to see the stall while requests are still waiting.
        if self.engine_stall_s + self.health_check_period_s >= self.request_timeout_s:
            raise ValueError(
                "engine_stall_s + health_check_period_s must be below request_timeout_s"
            )
        return self

    @model_validator(mode="after")
    def _heartbeats_before_death(self) -> Settings:
        # One late or failed heartbeat must not make a live replica look dead.
        if self.usage_owner_dead_after_s < 2 * self.usage_heartbeat_s:
            raise ValueError("usage_owner_dead_after_s must be at least 2 x usage_heartbeat_s")
        return self

    @property
    def engine_slots(self) -> int:
        """Sequences one replica's engine runs at once, as the fair queue shares them out:
        beyond vLLM's max_num_seqs requests would wait in vLLM's first-come queue instead."""
        return min(self.max_inflight_per_replica, self.served_model.engine.max_num_seqs)

    @property
    def ingress_server_maxconn(self) -> int | None:
        """Requests HAProxy hands one replica at once (None: no limit): what its
        admission can run or queue, plus `ingress_headroom`."""
        if not self.ingress_shedding:
            return None
        return self.engine_slots + self.queue_max_total + self.ingress_headroom

    @property
    def ingress_tenant_maxconn(self) -> int | None:
        """Requests of one tenant (one `Authorization` header) HAProxy hands the replicas
        at once, per replica up (None: no limit): what one replica's admission can run or
        queue for a single tenant (its engine slots less the reserved ones, plus the
        tenant's queue), plus `ingress_headroom`."""
        if not self.ingress_shedding:
            return None
        return (
            self.engine_slots
            - self.reserved_slots
            + self.queue_max_per_tenant
            + self.ingress_headroom
        )

    @property
    def reserved_slots(self) -> int:
        if self.queue_reserved_slots is not None:
            return min(self.queue_reserved_slots, self.engine_slots - 1)
        return self.engine_slots // 16

    @property
    def served_model(self) -> ModelSpec:
        """The catalog entry this application serves (the first one)."""
        return self.models[0]

    def model(self, name: str) -> ModelSpec | None:
        for spec in self.models:
            if spec.name == name:
                return spec
        return None


class ServeHttpSettings(BaseSettings):
    """What Serve's HTTP callback (`serve.gateway.serve_http`) reads in each process that
    runs one of Serve's HTTP servers. The callback takes no arguments, so this one setting
    comes from that process's environment (the chart sets it from the same value as the
    application's `stream_stall_s`); nothing else there is read, so no other variable can
    keep Serve from starting its servers."""

    model_config = SettingsConfigDict(env_prefix="BATCHSERVE_", extra="ignore")

    stream_stall_s: float = Field(default=STREAM_STALL_S, gt=0)
