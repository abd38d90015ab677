"""Model listing (OpenAI shape), saying which weights really serve each name.

Only the models of the caller's plan are listed; asking for one outside it is the
run route's 403 (`ModelNotInPlan`). `/v1/models/` (a trailing slash) is the listing.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from serve.errors import ModelNotInPlan
from serve.gateway import openapi_doc
from serve.gateway.context import GatewayContext
from serve.gateway.tenants import Tenant

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

    def listing(tenant: Tenant) -> dict[str, Any]:
        allowed = tenant.plan.allows_model(ctx.model_name)
        return {"object": "list", "data": [model_object()] if allowed else []}

    def one_model(tenant: Tenant, model: str) -> dict[str, Any]:
        ctx.require_model(model)  # unknown id: 404 model_not_found on these paths
        if not tenant.plan.allows_model(model):
            raise ModelNotInPlan(model)
        return model_object()

    listing_doc = openapi_doc.openai_models(one=False)
    single_doc = openapi_doc.openai_models(one=True)

    @router.get("/v1/models", **listing_doc)
    @router.get("/v1/models/", include_in_schema=False)
    async def list_models(request: Request) -> dict[str, Any]:
        return listing(ctx.authenticate(request, None))

    @router.get("/client/v4/accounts/{account_id}/ai/v1/models", **listing_doc)
    @router.get("/client/v4/accounts/{account_id}/ai/v1/models/", include_in_schema=False)
    async def list_account_models(request: Request, account_id: str) -> dict[str, Any]:
        return listing(ctx.authenticate(request, account_id))

    @router.get("/v1/models/{model:path}", **single_doc)
    async def get_model(request: Request, model: str) -> dict[str, Any]:
        return one_model(ctx.authenticate(request, None), model)

    @router.get("/client/v4/accounts/{account_id}/ai/v1/models/{model:path}", **single_doc)
    async def get_account_model(request: Request, account_id: str, model: str) -> dict[str, Any]:
        return one_model(ctx.authenticate(request, account_id), model)

    return router
