"""What every route of one server shares: the served model, keys, policy, batcher and meters,
and the small helpers that read a request the same way everywhere.

``create_app`` builds one :class:`Serving` and puts it on ``app.state.serving``; routes reach it
through the dependencies below, so they are plain module-level functions on routers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from nnobfuscator.serving.api_keys import KeyStore
from nnobfuscator.serving.auth import Authenticator, Principal
from nnobfuscator.serving.batcher import MicroBatcher
from nnobfuscator.serving.config import ServeConfig
from nnobfuscator.serving.errors import ApiError
from nnobfuscator.serving.generation_batcher import GenerationBatcher
from nnobfuscator.serving.images import decode_image
from nnobfuscator.serving.metrics import Metrics
from nnobfuscator.serving.payloads import read_image_payload
from nnobfuscator.serving.policy import Policy
from nnobfuscator.serving.policy_engine import PolicyEngine
from nnobfuscator.serving.results import CLASSIFICATION, SEGMENTATION, TEXT_TO_IMAGE, derived_seed
from nnobfuscator.serving.schemas import (
    ClassifyResponse,
    ErrorBody,
    GenerateRequest,
    GenerateResponse,
    SegmentResponse,
)
from nnobfuscator.serving.served_model import ServedModel
from nnobfuscator.serving.usage import UsageMeter

TIER_HEADER = "X-Tier"
#: the error answers every key-checked route documents
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "Corrupt image or malformed body",
        401: "Missing, invalid or revoked API key",
        403: "The key's tier does not allow this",
        404: "The served model's task has no such endpoint",
        413: "Body over the size limit",
        415: "Unsupported content type or image format",
        422: "Invalid parameters, image size or empty prompt",
        429: "Rate limit or quota of the key's tier used up (see Retry-After)",
    }.items()
}
TEXT_GENERATION = "text-generation"
ENDPOINTS = {
    CLASSIFICATION: "POST /v1/classify",
    SEGMENTATION: "POST /v1/segment",
    TEXT_GENERATION: "POST /v1/completions or POST /v1/chat/completions",
} | {task: "POST /v1/generate" for task in TEXT_TO_IMAGE}


@dataclass
class Serving:
    """One server's shared state (built once by ``create_app``)."""

    served: ServedModel
    store: KeyStore
    config: ServeConfig
    metrics: Metrics
    batcher: MicroBatcher
    engine: PolicyEngine
    usage: UsageMeter
    auth: Authenticator
    clock: Callable[[], datetime]
    reload_policy: Callable[[], Policy]
    #: the generation batcher of a text-generation model (``None`` for other tasks)
    generation: GenerationBatcher | None = None

    @property
    def tiers(self) -> list[str]:
        return self.served.model.tier_names

    async def image_input(self, request: Request) -> tuple[torch.Tensor, tuple[int, int], dict]:
        """The request's image as one model input, the image's size and the body's options."""
        payload = await read_image_payload(request, self.config.max_body_bytes)

        def prepare() -> tuple[torch.Tensor, tuple[int, int]]:
            image = decode_image(payload.data, max_side=self.config.max_image_side)
            return self.served.image_spec.to_tensor(image), image.size

        x, size = await run_in_threadpool(prepare)
        return x, size, payload.options

    def top_k(self, query: int | None, options: dict) -> int:
        value = query if query is not None else options.get("top_k", self.config.default_top_k)
        try:
            value = int(value)
        except (TypeError, ValueError):
            value = 0
        if not 1 <= value <= 1000:
            raise ApiError(422, "invalid_request", "top_k must be an integer from 1 to 1000")
        return value

    def prompt_sample(self, body: GenerateRequest, principal: Principal) -> tuple[Any, int | None]:
        """The sample the model gets for a prompt, and its seed (models that take one)."""
        if not self.served.takes_seed:
            return body.prompt, None
        seed = body.seed if body.seed is not None else derived_seed(principal.key.id, body.prompt)
        return {"prompt": body.prompt, "seed": seed}, seed

    @staticmethod
    def mask_format(query: str | None, options: dict) -> str:
        value = query or options.get("format") or "png"
        if value not in {"png", "rle"}:
            raise ApiError(422, "invalid_request", "format must be 'png' or 'rle'")
        return value


# --- dependencies ---------------------------------------------------------------------------
def serving(request: Request) -> Serving:
    """The server's shared state."""
    return request.app.state.serving


async def caller(request: Request) -> Principal:
    """An inference request's key, counted against its limits, quotas and usage."""
    return await serving(request).auth(request)


async def identified(request: Request) -> Principal:
    """Any other request's key, not counted."""
    return await serving(request).auth.identify(request)


def serves(*tasks: str) -> Callable[[Request], Any]:
    """A route guard: 404 with the right endpoint when the served model's task is another."""

    async def guard(request: Request) -> None:
        task = serving(request).served.task
        if task not in tasks:
            endpoint = ENDPOINTS.get(task)
            hint = f"; use {endpoint}" if endpoint else ""
            raise ApiError(
                404,
                "task_not_served",
                f"{request.url.path} needs a {' or '.join(sorted(tasks))} model; this server "
                f"serves a {task} model{hint}",
            )

    return guard


def answer(
    result: ClassifyResponse | SegmentResponse | GenerateResponse, principal: Principal
) -> Any:
    """The answer as JSON with the ``X-Tier`` header and the policy's headers (key tier, reason,
    rate limit); already validated, so FastAPI's response pass is skipped."""
    body = result.model_dump(exclude_none=True)
    return JSONResponse(body, headers={**principal.headers, TIER_HEADER: result.tier})
