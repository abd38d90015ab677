"""Model listing (OpenAI shape), saying which weights really serve each name."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

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

    @router.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        ctx.authenticator.authenticate(request.headers, None)
        return {"object": "list", "data": [model_object()]}

    @router.get("/client/v4/accounts/{account_id}/ai/v1/models")
    async def list_account_models(request: Request, account_id: str) -> dict[str, Any]:
        ctx.authenticator.authenticate(request.headers, account_id)
        return {"object": "list", "data": [model_object()]}

    return router
