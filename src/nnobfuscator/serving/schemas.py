"""Request and response bodies of the HTTP API (they make the OpenAPI docs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    error: str = Field(description="Machine-readable reason, e.g. 'invalid_image'.")
    detail: str = Field(description="What was wrong and what to do instead.")


class ImageRequest(BaseModel):
    image: str = Field(description="PNG or JPEG bytes, base64 (a data: URL is accepted too).")
    top_k: int | None = Field(None, ge=1, le=1000, description="Classes to return (classify).")
    format: Literal["png", "rle"] | None = Field(None, description="Mask encoding (segment).")


class GenerateRequest(BaseModel):
    prompt: str = Field(min_length=1, description="What to draw; must not be empty.")
    seed: int | None = Field(
        None,
        ge=0,
        le=2**63 - 1,
        description="Starting noise; without one it is derived from the key and the prompt, so a "
        "repeated request gives the same image.",
    )


class ScoredLabel(BaseModel):
    label: str
    index: int
    score: float | None = Field(
        None, description="Softmax probability (absent where the tier answers labels only)."
    )


class ClassifyResponse(BaseModel):
    tier: str = Field(description="The tier that produced this answer.")
    label: str
    index: int
    score: float | None = None
    top_k: list[ScoredLabel] = Field(
        description="The best classes, as many as asked and the tier's answer format allow."
    )
    answer_format: str = Field(
        "scores", description="What the tier answers: scores, top_k:N, top1 or label."
    )


class MaskRle(BaseModel):
    size: list[int] = Field(description="[height, width].")
    values: list[int] = Field(description="Class of each run, row-major.")
    counts: list[int] = Field(description="Length of each run.")


class SegmentResponse(BaseModel):
    tier: str
    width: int
    height: int
    classes: list[int] = Field(description="Class indices present in the mask.")
    labels: list[str] = Field(description="Names of the classes present.")
    format: Literal["png", "rle"]
    mask: str | None = Field(None, description="Base64 PNG; pixel value = class index.")
    rle: MaskRle | None = None


class GenerateResponse(BaseModel):
    tier: str
    prompt: str
    seed: int | None = Field(None, description="The seed the image was drawn with.")
    image: str = Field(description="Base64 PNG.")


class CompareResponse(BaseModel):
    task: str
    results: list[ClassifyResponse | SegmentResponse | GenerateResponse] = Field(
        description="One answer per tier, lowest tier first."
    )


class TierInfo(BaseModel):
    name: str
    target: str
    full: bool
    metrics: dict[str, float]
    relative_cost: float | None
    rate_limit: str | None = Field(description="Per-key limit, e.g. '60/min'; null = none.")
    quota: str | None = Field(None, description="Per-key quota, e.g. '1000/day'; null = none.")
    on_exhausted: str | None = Field(
        None, description="What happens once the quota is used up: 'reject' or 'downgrade to T'."
    )
    token_quota: str | None = Field(
        None, description="Per-key prompt plus completion tokens, e.g. '20000/day' (text models)."
    )
    served_now: str | None = Field(
        None, description="The tier this tier's requests are served at now (schedule, brownout)."
    )


class TiersResponse(BaseModel):
    task: str
    model: str
    tiers: list[TierInfo]
    brownout: dict[str, Any] | None = Field(
        None, description="The brownout rule and whether it is on now (null: no brownout)."
    )
    schedules_in_force: list[str] = Field(default_factory=list)
    priority: bool = Field(True, description="Whether higher tiers are batched first.")


class KeyInfo(BaseModel):
    id: str
    name: str | None
    tier: str = Field(description="The tier this key gets by default.")
    served_tier: str | None = Field(
        None, description="The tier a request of this key is served at now."
    )
    reasons: list[str] = Field(
        default_factory=list, description="Why they differ: quota, load or schedule."
    )
    owner: bool


class HealthResponse(BaseModel):
    status: Literal["ok"]
    task: str
    model: str
    tiers: list[str]
    pending: int = Field(description="Requests waiting for the next batch.")
