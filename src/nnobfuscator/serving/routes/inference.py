"""Inference: classify, segment and generate at the key's tier, and compare every tier (owner
keys). Requests of every tier share the micro-batcher: one forward pass, a tier per sample."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse

from nnobfuscator.serving.auth import Principal
from nnobfuscator.serving.images import generated_png
from nnobfuscator.serving.payloads import IMAGE_BODY_DOC, read_prompt
from nnobfuscator.serving.results import (
    CLASSIFICATION,
    SEGMENTATION,
    TEXT_TO_IMAGE,
    classify_answer,
    generate_answer,
    segment_answer,
)
from nnobfuscator.serving.schemas import (
    ClassifyResponse,
    CompareResponse,
    GenerateRequest,
    GenerateResponse,
    SegmentResponse,
)
from nnobfuscator.serving.state import (
    ERRORS,
    TIER_HEADER,
    Serving,
    answer,
    caller,
    identified,
    serves,
    serving,
)

router = APIRouter(tags=["inference"], responses=ERRORS)


@router.post(
    "/v1/classify",
    response_model=ClassifyResponse,
    openapi_extra=IMAGE_BODY_DOC,
    dependencies=[Depends(serves(CLASSIFICATION))],
)
async def classify(
    request: Request,
    principal: Principal = Depends(caller),
    state: Serving = Depends(serving),
    top_k: int | None = Query(None, ge=1, le=1000, description="Classes to return."),
) -> JSONResponse:
    """Classify one image (multipart field `image`, JSON `{"image": BASE64}` or raw bytes)."""
    x, _, options = await state.image_input(request)
    k = state.top_k(top_k, options)
    output = await state.batcher.submit(x, principal.tier)
    return answer(classify_answer(state.served, output, principal.tier, k), principal)


@router.post(
    "/v1/segment",
    response_model=SegmentResponse,
    response_model_exclude_none=True,
    openapi_extra=IMAGE_BODY_DOC,
    dependencies=[Depends(serves(SEGMENTATION))],
)
async def segment(
    request: Request,
    principal: Principal = Depends(caller),
    state: Serving = Depends(serving),
    format: str | None = Query(None, pattern="^(png|rle)$", description="Mask encoding."),
) -> JSONResponse:
    """Segment one image; the class mask comes back at the image's size, as PNG or RLE."""
    x, size, options = await state.image_input(request)
    fmt = state.mask_format(format, options)
    output = await state.batcher.submit(x, principal.tier)
    return answer(segment_answer(state.served, output, principal.tier, size, fmt), principal)


@router.post(
    "/v1/generate",
    response_model=GenerateResponse,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": GenerateRequest.model_json_schema()}},
        }
    },
    dependencies=[Depends(serves(*TEXT_TO_IMAGE))],
)
async def generate(
    request: Request, principal: Principal = Depends(caller), state: Serving = Depends(serving)
) -> Response:
    """Generate an image from a prompt (JSON `{"prompt": "...", "seed": 7}`): base64 PNG in JSON,
    or the PNG itself with `Accept: image/png`. Without a seed, one is derived from the key and
    the prompt, so a repeated request gives the same image."""
    config = state.config
    body = await read_prompt(request, config.max_body_bytes, config.max_prompt_chars)
    sample, seed = state.prompt_sample(body, principal)
    output = await state.batcher.submit(sample, principal.tier)
    result = generate_answer(output, principal.tier, body.prompt, seed)
    if "image/png" in request.headers.get("accept", ""):
        headers = {
            **principal.headers,
            TIER_HEADER: result.tier,
            **({"X-Seed": str(seed)} if seed is not None else {}),
        }
        return Response(generated_png(output), media_type="image/png", headers=headers)
    return answer(result, principal)


@router.post(
    "/v1/compare",
    response_model=CompareResponse,
    response_model_exclude_none=True,
    openapi_extra=IMAGE_BODY_DOC,
)
async def compare(
    request: Request,
    principal: Principal = Depends(identified),
    state: Serving = Depends(serving),
    top_k: int | None = Query(None, ge=1, le=1000),
    format: str | None = Query(None, pattern="^(png|rle)$"),
) -> CompareResponse:
    """Owner keys only: run the same input at every tier, side by side."""
    state.auth.require_owner(principal)
    tiers, served, submit = state.tiers, state.served, state.batcher.submit
    if served.task in TEXT_TO_IMAGE:
        config = state.config
        body = await read_prompt(request, config.max_body_bytes, config.max_prompt_chars)
        sample, seed = state.prompt_sample(body, principal)  # one seed: tiers side by side
        outputs = await asyncio.gather(*(submit(sample, t) for t in tiers))
        results: list[Any] = [
            generate_answer(o, t, body.prompt, seed) for o, t in zip(outputs, tiers, strict=True)
        ]
        return CompareResponse(task=served.task, results=results)
    x, size, options = await state.image_input(request)
    outputs = await asyncio.gather(*(submit(x, t) for t in tiers))
    if served.task == SEGMENTATION:
        fmt = state.mask_format(format, options)
        results = [
            segment_answer(served, o, t, size, fmt) for o, t in zip(outputs, tiers, strict=True)
        ]
    else:
        k = state.top_k(top_k, options)
        results = [
            classify_answer(served, o, t, k, owner=True)
            for o, t in zip(outputs, tiers, strict=True)
        ]
    return CompareResponse(task=served.task, results=results)
