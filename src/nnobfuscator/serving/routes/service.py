"""Pages and probes: the try-it page, the owner page, health and Prometheus metrics."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Depends, Response
from fastapi.responses import HTMLResponse
from prometheus_client import CONTENT_TYPE_LATEST

from nnobfuscator.serving.schemas import HealthResponse
from nnobfuscator.serving.state import Serving, serving

STATIC = resources.files("nnobfuscator.serving") / "static"
router = APIRouter()


@router.get("/", include_in_schema=False)
async def index() -> HTMLResponse:
    return HTMLResponse((STATIC / "index.html").read_text())


@router.get("/owner", include_in_schema=False)
async def owner_page() -> HTMLResponse:
    """The owner page (it asks for an owner key and reads ``/v1/owner/stats``)."""
    return HTMLResponse((STATIC / "owner.html").read_text())


@router.get("/healthz", response_model=HealthResponse, tags=["service"])
async def healthz(state: Serving = Depends(serving)) -> HealthResponse:
    """Liveness: the model is loaded and the batcher is accepting work."""
    return HealthResponse(
        status="ok",
        task=state.served.task,
        model=state.served.model.model_name,
        tiers=state.tiers,
        pending=state.batcher.pending,
    )


@router.get("/metrics", tags=["service"], response_class=Response)
async def prometheus_metrics(state: Serving = Depends(serving)) -> Response:
    """Prometheus metrics, labelled by endpoint and tier (never by key)."""
    state.metrics.queue_depth.set(state.batcher.pending)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
