"""The Workers AI catalog: model, task and author search (the `cloudflare` SDK's
`ai.models.list`, `ai.tasks.list` and `ai.authors.list`).

The catalog is the one model this deployment serves, described as the hosted API
described it, plus what really serves it: a `weights` property and the engine's real
`context_window`. Only the models of the caller's plan are listed. Query parameters are
read by hand, so a bad one is a 400/5006 of this dialect after authentication (FastAPI
would answer 422 before it). The SDK pages through the model search until a page comes
back empty.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any, Final

from fastapi import APIRouter, Request
from starlette.datastructures import QueryParams
from starlette.responses import Response

from serve.errors import BadInput
from serve.gateway import openapi_doc
from serve.gateway.context import GatewayContext
from serve.gateway.envelope import envelope
from serve.gateway.tenants import Tenant
from serve.settings import QWEN_API_NAME

_ACCOUNT_AI: Final = "/client/v4/accounts/{account_id}/ai"
MODELS_SEARCH_PATH: Final = _ACCOUNT_AI + "/models/search"
TASKS_SEARCH_PATH: Final = _ACCOUNT_AI + "/tasks/search"
AUTHORS_SEARCH_PATH: Final = _ACCOUNT_AI + "/authors/search"
DEFAULT_PER_PAGE: Final = 20
MAX_PER_PAGE: Final = 100

TEXT_GENERATION: Final[dict[str, str]] = {
    "id": "c329a1f9-323d-4e91-b2aa-582dd4188d34",
    "name": "Text Generation",
    "description": "Family of generative text models, such as large language models (LLM), "
    "that can be adapted for a variety of natural language tasks.",
}
# The hosted catalog's entry for the name (Cloudflare's docs, workers-ai-models).
_HOSTED: Final[dict[str, dict[str, Any]]] = {
    QWEN_API_NAME: {
        "id": "3222ddb3-e211-4fd9-9a6d-79a80e47b3a6",
        "source": 1,
        "description": "Qwen1.5 is the improved version of Qwen, the large language model "
        "series developed by Alibaba Cloud.",
        "properties": [
            {"property_id": "beta", "value": "true"},
            {"property_id": "info", "value": "https://huggingface.co/qwen/qwen1.5-1.8b-chat"},
        ],
    }
}


def author_of(name: str) -> str:
    """`@cf/qwen/qwen1.5-1.8b-chat` → `qwen`."""
    parts = name.split("/")
    return parts[1] if len(parts) >= 3 else ""


def model_entry(name: str, weights: str, context_window: int) -> dict[str, Any]:
    """The catalog entry of `name`: the hosted one where there is one."""
    hosted = _HOSTED.get(name, {})
    return {
        "id": hosted.get("id", str(uuid.uuid5(uuid.NAMESPACE_URL, name))),
        "source": hosted.get("source", 1),
        "name": name,
        "description": hosted.get("description", ""),
        "task": dict(TEXT_GENERATION),
        "tags": [],
        "properties": [
            *hosted.get("properties", []),
            {"property_id": "context_window", "value": str(context_window)},
            {"property_id": "weights", "value": weights},
        ],
    }


def _is_experimental(model: dict[str, Any]) -> bool:
    """Marked `experimental`. A `beta` model is not: the hosted catalog marked most text
    models beta, this one included, and a self-hosted deployment runs what it serves."""
    return any(
        p["property_id"] == "experimental" and p["value"] == "true" for p in model["properties"]
    )


# -- query parameters (absent or empty: the default) ---------------------------------


def _int(params: QueryParams, name: str, default: int, highest: int | None = None) -> int:
    raw = params.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadInput(f"{name} must be an integer", param=name) from None
    if value < 1 or (highest is not None and value > highest):
        span = f"between 1 and {highest}" if highest is not None else "at least 1"
        raise BadInput(f"{name} must be {span}", param=name)
    return value


def _bool(params: QueryParams, name: str) -> bool:
    raw = (params.get(name) or "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise BadInput(f"{name} must be true or false", param=name)
    return raw in ("true", "1")


def _number(params: QueryParams, name: str) -> float | None:
    raw = params.get(name)
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise BadInput(f"{name} must be a number", param=name)
    return value


@dataclass(frozen=True)
class ModelFilter:
    """The model search's filters (text compared case-insensitively)."""

    search: str = ""
    task: str = ""
    author: str = ""
    source: float | None = None
    hide_experimental: bool = False

    @classmethod
    def of(cls, params: QueryParams) -> ModelFilter:
        """Every parameter is checked, even when there is nothing to filter."""
        if params.get("format"):
            raise BadInput("format is not supported by this deployment", param="format")
        _bool(params, "include_deprecated")  # nothing listed here is deprecated
        return cls(
            search=(params.get("search") or "").casefold(),
            task=(params.get("task") or "").casefold(),
            author=(params.get("author") or "").casefold(),
            source=_number(params, "source"),
            hide_experimental=_bool(params, "hide_experimental"),
        )

    def admits(self, model: dict[str, Any]) -> bool:
        task = model["task"]
        return (
            self.search in f"{model['name']}\n{model['description']}".casefold()
            and (not self.task or self.task in (task["name"].casefold(), task["id"]))
            and (not self.author or self.author == author_of(model["name"]).casefold())
            and (self.source is None or self.source == model["source"])
            and not (self.hide_experimental and _is_experimental(model))
        )


def catalog_router(ctx: GatewayContext) -> APIRouter:
    router = APIRouter()

    def catalog(tenant: Tenant) -> list[dict[str, Any]]:
        """The entries the tenant's plan allows (this deployment serves one model)."""
        if not tenant.plan.allows_model(ctx.model_name):
            return []
        info = ctx.engine.info
        return [model_entry(ctx.model_name, info.weights, info.context_window)]

    @router.get(MODELS_SEARCH_PATH, **openapi_doc.workers_ai_model_search(MAX_PER_PAGE))
    async def search_models(request: Request, account_id: str) -> Response:
        tenant = ctx.authenticate(request, account_id)
        params = request.query_params
        page = _int(params, "page", 1)
        per_page = _int(params, "per_page", DEFAULT_PER_PAGE, MAX_PER_PAGE)
        wanted = ModelFilter.of(params)
        found = [m for m in catalog(tenant) if wanted.admits(m)]
        start = (page - 1) * per_page
        shown = found[start : start + per_page]
        info = {"page": page, "per_page": per_page, "count": len(shown), "total_count": len(found)}
        return envelope(shown, [], result_info=info)

    @router.get(TASKS_SEARCH_PATH, **openapi_doc.workers_ai_task_search())
    async def search_tasks(request: Request, account_id: str) -> Response:
        tasks = {m["task"]["id"]: m["task"] for m in catalog(ctx.authenticate(request, account_id))}
        return envelope(list(tasks.values()), [])

    @router.get(AUTHORS_SEARCH_PATH, **openapi_doc.workers_ai_author_search())
    async def search_authors(request: Request, account_id: str) -> Response:
        models = catalog(ctx.authenticate(request, account_id))
        names = sorted({author_of(m["name"]) for m in models} - {""})
        return envelope([{"name": name} for name in names], [])

    return router
