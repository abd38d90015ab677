"""The one exception tree.

Each error knows its HTTP status, its Workers AI error code and its OpenAI
error type. They are turned into bytes on the wire in exactly one place:
`serve.gateway.error_wire`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # the limiter's module raises these errors: no import at run time
    from serve.gateway.ratelimit import RateState

# Why a request was refused with 429 (the `reason` label of batchserve_rejections_total,
# `serve.metrics.REJECTION_REASONS`): rate, tokens, concurrency (tenant limits),
# queue_full (this replica's admission), capacity (the cluster).
RejectionReason = Literal["rate", "tokens", "concurrency", "queue_full", "capacity"]


class BatchserveError(Exception):
    """Base of every error batchserve reports to a client."""

    status: int = 500
    code: int = 3008
    openai_type: str = "server_error"
    openai_code: str | None = None
    # The status of the OpenAI dialect when OpenAI's clients expect another (None: `status`).
    openai_status: int | None = None
    # The message of the OpenAI dialect when OpenAI's clients read another (None: `message`).
    openai_message: str | None = None
    # Errors raised before the request reached inference carry `result: null`
    # (Cloudflare's API-gateway layer); inference-layer errors carry `result: {}`.
    gateway_layer: bool = False
    # The response closes the connection (the request was not read to its end).
    close_connection: bool = False
    # The methods the URI supports: a 405's `Allow` header (RFC 9110 requires one).
    allowed: tuple[str, ...] = ()
    # The causes Cloudflare's v4 API lists under the error (`error_chain`): (code, message).
    chain: tuple[tuple[int, str], ...] = ()

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s


# -- 4xx: the caller can fix it ------------------------------------------------------


class BadInput(BatchserveError):
    """The body does not match the model's input schema (or is not JSON)."""

    status = 400
    code = 5006
    openai_type = "invalid_request_error"

    def __init__(self, reason: str, *, param: str | None = None) -> None:
        super().__init__(f"AiError: Bad input: {reason}", param=param)
        self.reason = reason


class UnknownModel(BatchserveError):
    status = 400
    code = 5007
    openai_type = "invalid_request_error"
    openai_code = "model_not_found"
    openai_status = 404

    def __init__(self, model: str) -> None:
        message = (
            f"No such model {model} or task"
            if model
            else "No such model or task: the model name is empty"
        )
        super().__init__(message, param="model")
        self.model = model


class LoraUnsupported(BatchserveError):
    status = 405
    code = 5005
    openai_type = "invalid_request_error"
    allowed = ("POST",)  # raised only by the run route (its 405 is Cloudflare's choice)

    def __init__(self, model: str) -> None:
        super().__init__(f"AiError: LoRA is not supported for model {model}", param="lora")


class ContextWindowExceeded(BatchserveError):
    status = 413
    code = 5021
    openai_type = "invalid_request_error"
    openai_code = "context_length_exceeded"
    openai_status = 400  # OpenAI's BadRequestError

    def __init__(self, requested: int, window: int, *, param: str = "max_tokens") -> None:
        super().__init__(
            "AiError: The estimated number of input and maximum output tokens "
            f"({requested}) exceeded this model context window limit ({window}).",
            param=param,
        )
        self.requested = requested
        self.window = window
        # OpenAI's and vLLM's wording (hosted Workers AI's vLLM models say it too): clients
        # of the OpenAI dialect match this text, not the code (LiteLLM's
        # ContextWindowExceededError, which its context-window fallbacks catch).
        self.openai_message = (
            f"AiError: This model's maximum context length is {window} tokens. However, you "
            f"requested {requested} tokens (input and maximum output together). Please reduce "
            "the length of the messages or max_tokens."
        )


class BodyTooLarge(BatchserveError):
    status = 413
    code = 3006
    openai_type = "invalid_request_error"
    gateway_layer = True

    def __init__(self, limit: int) -> None:
        super().__init__(f"Request is too large: the body limit is {limit} bytes")


class UnsupportedContentEncoding(BadInput):
    """A compressed request body (Content-Encoding): it would otherwise read as bad JSON."""

    status = 415

    def __init__(self, coding: str) -> None:
        super().__init__(
            f"Content-Encoding {coding[:40]!r} is not supported: send the body uncompressed",
            param="Content-Encoding",
        )


class MissingCredentials(BatchserveError):
    status = 400
    code = 9106
    openai_type = "invalid_request_error"
    openai_status = 401  # OpenAI's AuthenticationError
    gateway_layer = True

    def __init__(
        self, message: str = "Missing X-Auth-Key, X-Auth-Email or Authorization headers"
    ) -> None:
        super().__init__(message)


class MalformedAuthorization(BatchserveError):
    """An Authorization header that is not `Bearer <token>` (Cloudflare's v4 API: 400,
    6003 with the cause 6111 in `error_chain`)."""

    status = 400
    code = 6003
    openai_type = "invalid_request_error"
    openai_code = "invalid_api_key"
    openai_status = 401
    gateway_layer = True
    chain = ((6111, "Invalid format for Authorization header"),)

    def __init__(self) -> None:
        super().__init__("Invalid request headers")


class AuthenticationFailed(BatchserveError):
    status = 401
    code = 10000
    openai_type = "invalid_request_error"
    openai_code = "invalid_api_key"
    gateway_layer = True

    def __init__(self) -> None:
        super().__init__("Authentication error")


class AccountForbidden(BatchserveError):
    status = 403
    code = 10000
    openai_type = "permission_error"
    gateway_layer = True

    def __init__(self) -> None:
        super().__init__("Authentication error: this token does not own the account")


class OutOfCapacity(BatchserveError):
    status = 429
    code = 3040
    openai_type = "rate_limit_error"
    openai_code = "rate_limit_exceeded"
    reason: RejectionReason = "capacity"

    def __init__(
        self,
        message: str = "Capacity temporarily exceeded, please try again.",
        *,
        retry_after_s: float = 1.0,
        reason: RejectionReason | None = None,
    ) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        if reason is not None:
            self.reason = reason


class TenantRateLimited(OutOfCapacity):
    """The tenant is over one of its plan's limits (or its gateway queue is full)."""

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float,
        reason: RejectionReason,
        state: RateState | None = None,
    ) -> None:
        super().__init__(message, retry_after_s=retry_after_s, reason=reason)
        # The `X-RateLimit-*` state to report: the counters the limiter refused on (None
        # for the fair queue's refusals, which decide on no counters).
        self.state = state


class RateLimiterUnavailable(BatchserveError):
    """The shared limiter (Redis) is unreachable and the gateway fails closed."""

    status = 503
    code = 3040
    openai_type = "server_error"

    def __init__(self) -> None:
        super().__init__("Rate limiter unavailable, please retry.", retry_after_s=1.0)


class ModelNotInPlan(BatchserveError):
    status = 403
    code = 10000
    openai_type = "permission_error"
    gateway_layer = True

    def __init__(self, model: str) -> None:
        super().__init__(f"Authentication error: this token's plan does not include {model}")


class MethodNotAllowed(BatchserveError):
    status = 405
    code = 7001
    openai_type = "invalid_request_error"
    gateway_layer = True

    def __init__(self, method: str, *, allowed: tuple[str, ...] = ()) -> None:
        super().__init__(f"{method} not supported for requested URI.")
        self.allowed = allowed


class RouteNotFound(BatchserveError):
    status = 404
    code = 7003
    openai_type = "invalid_request_error"
    gateway_layer = True

    def __init__(self, path: str) -> None:
        super().__init__(f"Could not route to {path}, perhaps your object identifier is invalid?")


class FrameworkHttpError(BatchserveError):
    """An HTTP error the web framework raised itself with a status no other error here
    names: its status and detail, in the envelope of a server error."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


# -- 5xx and timeouts: ours --------------------------------------------------------------


class RequestTimeout(BatchserveError):
    status = 408
    code = 3007
    openai_type = "timeout_error"

    def __init__(self, message: str = "AiError: Request timeout") -> None:
        super().__init__(message)


class SlowClient(RequestTimeout):
    """The client did not send a part of its request in time; the connection is closed,
    since the rest of the request was never read."""

    gateway_layer = True
    close_connection = True
    part = "request"

    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            f"AiError: Request timeout: the {self.part} took longer than {timeout_s:g} s"
        )


class BodyTimeout(SlowClient):
    """The request body did not arrive in time (a slow or stalled upload)."""

    part = "request body"


class HeaderTimeout(SlowClient):
    """The request headers did not arrive in time (slowloris)."""

    part = "request headers"


class EngineFailure(BatchserveError):
    status = 500
    code = 3008
    openai_type = "server_error"

    def __init__(self, message: str = "AiError: Inference failed, please retry") -> None:
        super().__init__(message)


class EngineUnavailable(BatchserveError):
    status = 503
    code = 3040
    openai_type = "server_error"

    def __init__(self, message: str = "AiError: The model is not ready yet") -> None:
        super().__init__(message, retry_after_s=5.0)


class ReplicaShuttingDown(BatchserveError):
    """The replica is draining and its budget is about to run out (`serve.replica.drain`):
    a generation still running ends now, with an error its client can act on, instead of
    a connection cut when Serve stops the replica."""

    status = 503
    code = 3040
    openai_type = "server_error"

    def __init__(self) -> None:
        super().__init__(
            "AiError: The replica serving this request is shutting down, please retry",
            retry_after_s=1.0,
        )


class EngineStalled(EngineUnavailable):
    """The engine holds unfinished requests but produced nothing for `stalled_s`
    (`serve.replica.watchdog`): the replica fails its health check."""

    def __init__(self, stalled_s: float, unfinished: int) -> None:
        super().__init__(
            f"AiError: The inference engine made no progress for {stalled_s:.0f} s "
            f"with {unfinished} unfinished requests"
        )
        self.stalled_s = stalled_s
        self.unfinished = unfinished
