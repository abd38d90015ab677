"""Model listing (OpenAI shape), saying which weights really serve each name."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from serve.gateway import openapi_doc
from serve.gateway.context import GatewayContext

_CREATED = 1707868800  # Qwen1.5's release, a stable `created` for the listing


def models_router(ctx: GatewayContext) -> APIRouter:
    router = APIRouter()

    def model_object() -> dict[str, Any]:
        info = ctx.engine.info
        return {
            "id": ctx.model_name,
            "object": "model",
            "created": _CREATED,
            "owned_by": "batchserve",
            "weights": info.weights,
            "context_window": info.context_window,
        }

    listing = openapi_doc.openai_models(one=False)
    single = openapi_doc.openai_models(one=True)

    @router.get("/v1/models", **listing)
    async def list_models(request: Request) -> dict[str, Any]:
        ctx.authenticate(request, None)
        return {"object": "list", "data": [model_object()]}

    @router.get("/client/v4/accounts/{account_id}/ai/v1/models", **listing)
    async def list_account_models(request: Request, account_id: str) -> dict[str, Any]:
        ctx.authenticate(request, account_id)
        return {"object": "list", "data": [model_object()]}

    def one_model(model: str) -> dict[str, Any]:
        ctx.require_model(model)  # unknown id: 404 model_not_found on these paths
        return model_object()

    @router.get("/v1/models/{model:path}", **single)
    async def get_model(request: Request, model: str) -> dict[str, Any]:
        ctx.authenticate(request, None)
        return one_model(model)

    @router.get("/client/v4/accounts/{account_id}/ai/v1/models/{model:path}", **single)
    async def get_account_model(request: Request, account_id: str, model: str) -> dict[str, Any]:
        ctx.authenticate(request, account_id)
        return one_model(model)

    return router
