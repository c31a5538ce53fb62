"""The HTTP service: ``create_app()`` builds one FastAPI app for uvicorn or Ray Serve.

Every request's API key picks its tier; requests are micro-batched across tiers into one forward
pass with a tier per sample (``model(x, tiers=[...])``), so no request can see another's tier.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from nnobfuscator.core.model import TieredModel
from nnobfuscator.serving.api_keys import KeyStore
from nnobfuscator.serving.auth import Authenticator, Principal
from nnobfuscator.serving.batcher import MicroBatcher
from nnobfuscator.serving.config import ServeConfig
from nnobfuscator.serving.errors import ApiError, install_error_handlers
from nnobfuscator.serving.images import decode_image, generated_png
from nnobfuscator.serving.limiter import LimitStore
from nnobfuscator.serving.load_signals import LoadMonitor
from nnobfuscator.serving.metrics import Metrics
from nnobfuscator.serving.middleware import ServingMiddleware
from nnobfuscator.serving.payloads import IMAGE_BODY_DOC, read_image_payload, read_prompt
from nnobfuscator.serving.policy import Policy, PolicyError, default_policy, load_policy, utc_now
from nnobfuscator.serving.policy_engine import PolicyEngine
from nnobfuscator.serving.results import (
    CLASSIFICATION,
    SEGMENTATION,
    TEXT_TO_IMAGE,
    classify_answer,
    derived_seed,
    generate_answer,
    segment_answer,
)
from nnobfuscator.serving.schemas import (
    ClassifyResponse,
    CompareResponse,
    ErrorBody,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    KeyInfo,
    SegmentResponse,
    TierInfo,
    TiersResponse,
)
from nnobfuscator.serving.served_model import ServedModel, load_artifact, serve_model
from nnobfuscator.serving.usage import UsageMeter, usage_meter
from nnobfuscator.version import __version__

TIER_HEADER = "X-Tier"
_ERRORS: dict[int | str, dict[str, Any]] = {
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
_STATIC = resources.files("nnobfuscator.serving") / "static"


def create_app(
    model: TieredModel | ServedModel | str | Path,
    *,
    keys: KeyStore | str | Path | None = None,
    config: ServeConfig | None = None,
    policy: Policy | str | Path | None = None,
    clock: Callable[[], datetime] = utc_now,
) -> FastAPI:
    """Build the API for one tiered model.

    Args:
        model: an artifact directory (its base model is rebuilt from its stored source), or a
            loaded ``TieredModel`` / ``ServedModel``.
        keys: the key store or its SQLite path (default ``$NNOBF_HOME/keys.sqlite``).
        config: batching, limits and rate limits (default :class:`ServeConfig`).
        policy: the serving policy or its YAML file (quotas, brownout, schedules, priority;
            :mod:`nnobfuscator.serving.policy`); a file can be reloaded on SIGHUP or
            ``POST /v1/policy/reload``. Default: ``config.rate_limits`` only.
        clock: the current UTC time (schedules; injectable for tests).

    Example:
        >>> app = create_app("runs/resnet18-feature-mix", keys="keys.sqlite")
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    if isinstance(model, ServedModel):
        served = model
    elif isinstance(model, TieredModel):
        served = serve_model(model)
    else:
        served = load_artifact(model)
    store = keys if isinstance(keys, KeyStore) else KeyStore(keys)
    config = config or ServeConfig()
    metrics = Metrics()
    tiers = served.model.tier_names
    policy_path = None if policy is None or isinstance(policy, Policy) else Path(policy)
    if policy is None:  # with a policy file, its rules replace config.rate_limits
        policy = default_policy(tiers, config.rate_limits)
    elif policy_path is not None:
        policy = load_policy(policy_path, tiers)
    load = LoadMonitor(depth=lambda: batcher.pending)
    engine = PolicyEngine(policy, LimitStore(config.limits_store), load, clock)

    def rank(tier: str) -> int:
        return tiers.index(tier) if engine.policy.spec.priority else 0

    def on_batch(names: list[str], seconds: float) -> None:
        metrics.record_batch(names, seconds)
        load.record_batch(seconds)

    batcher = MicroBatcher(
        lambda batch, names: _forward(served.model, batch, names),
        max_batch_size=config.max_batch_size,
        max_wait_ms=config.max_wait_ms,
        on_batch=on_batch,
        on_wait=load.record_wait,
        rank=rank,
        cost=lambda tier: served.model.get_tier(tier).relative_cost or 1.0,
        preempt_ms=config.preempt_ms,
    )
    usage = _usage_meter(store, config)
    auth = Authenticator(store, tiers, engine, metrics, usage)

    def reload_policy() -> Policy:
        """Re-read the policy file; a bad one raises :class:`PolicyError` and the old stays."""
        if policy_path is None:
            raise PolicyError("this server was started without --policy; nothing to reload")
        fresh = load_policy(policy_path, tiers)
        engine.reload(fresh)
        return fresh

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        if policy_path is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signal.SIGHUP, _reload_logged, reload_policy)
        usage.start_background_flush()
        yield
        await batcher.aclose()
        with contextlib.suppress(Exception):  # a store that is down loses only the last second
            usage.stop()

    app = FastAPI(
        title="nnobfuscator",
        version=__version__,
        summary=f"Tiered {served.task} model {served.model.model_name!r}: the API key picks the "
        f"tier ({', '.join(tiers)}).",
        description="Send the key as `Authorization: Bearer KEY` or `X-API-Key: KEY`. Every "
        f"answer names the tier that produced it, in the body and the `{TIER_HEADER}` header.",
        lifespan=lifespan,
    )
    app.state.served, app.state.keys, app.state.config = served, store, config
    app.state.metrics, app.state.batcher = metrics, batcher
    app.state.engine, app.state.usage, app.state.reload_policy = engine, usage, reload_policy
    install_error_handlers(app)
    app.add_middleware(ServingMiddleware, metrics=metrics, max_body_bytes=config.max_body_bytes)
    app.mount("/static", StaticFiles(directory=str(_STATIC)), name="static")

    def serves(*tasks: str) -> Callable[[Request], None]:
        async def guard(request: Request) -> None:
            if served.task not in tasks:
                endpoint = _ENDPOINTS.get(served.task)
                hint = f"; use {endpoint}" if endpoint else ""
                raise ApiError(
                    404,
                    "task_not_served",
                    f"{request.url.path} needs a {' or '.join(sorted(tasks))} model; this server "
                    f"serves a {served.task} model{hint}",
                )

        return guard

    async def image_input(request: Request) -> tuple[torch.Tensor, tuple[int, int], dict]:
        payload = await read_image_payload(request, config.max_body_bytes)

        def prepare() -> tuple[torch.Tensor, tuple[int, int]]:
            image = decode_image(payload.data, max_side=config.max_image_side)
            return served.image_spec.to_tensor(image), image.size

        x, size = await run_in_threadpool(prepare)
        return x, size, payload.options

    def top_k_of(query: int | None, options: dict) -> int:
        value = query if query is not None else options.get("top_k", config.default_top_k)
        try:
            value = int(value)
        except (TypeError, ValueError):
            value = 0
        if not 1 <= value <= 1000:
            raise ApiError(422, "invalid_request", "top_k must be an integer from 1 to 1000")
        return value

    def prompt_sample(body: GenerateRequest, principal: Principal) -> tuple[Any, int | None]:
        """The sample the model gets for a prompt, and its seed (models that take one)."""
        if not served.takes_seed:
            return body.prompt, None
        seed = body.seed if body.seed is not None else derived_seed(principal.key.id, body.prompt)
        return {"prompt": body.prompt, "seed": seed}, seed

    def mask_format(query: str | None, options: dict) -> str:
        value = query or options.get("format") or "png"
        if value not in {"png", "rle"}:
            raise ApiError(422, "invalid_request", "format must be 'png' or 'rle'")
        return value

    # --- pages and probes --------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse((_STATIC / "index.html").read_text())

    @app.get("/owner", include_in_schema=False)
    async def owner_page() -> HTMLResponse:
        """The owner page (it asks for an owner key and reads ``/v1/owner/stats``)."""
        return HTMLResponse((_STATIC / "owner.html").read_text())

    @app.get("/healthz", response_model=HealthResponse, tags=["service"])
    async def healthz() -> HealthResponse:
        """Liveness: the model is loaded and the batcher is accepting work."""
        return HealthResponse(
            status="ok",
            task=served.task,
            model=served.model.model_name,
            tiers=tiers,
            pending=batcher.pending,
        )

    @app.get("/metrics", tags=["service"], response_class=Response)
    async def prometheus_metrics() -> Response:
        """Prometheus metrics, labelled by endpoint and tier (never by key)."""
        metrics.queue_depth.set(batcher.pending)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/tiers", response_model=TiersResponse, tags=["tiers"])
    async def list_tiers() -> TiersResponse:
        """The tiers of the served model, lowest first, with their measured metrics and the
        policy in force (limits, quotas, brownout, schedules)."""
        rows = []
        current = engine.policy
        status = engine.status()
        browned = bool(status["brownout"] and status["brownout"]["active"])
        now = clock()
        brownout = current.spec.brownout
        for row in served.model.status():
            name = row["tier"]
            rule = current.rule(name)
            served_now = current.scheduled(name, now) or name
            if browned and brownout is not None and served_now in brownout.serve:
                served_now = brownout.serve[served_now]
            exhausted = rule.on_exhausted
            rows.append(
                TierInfo(
                    name=name,
                    target=row["target"],
                    full=served.model.get_tier(name).is_full,
                    metrics={k: float(v) for k, v in row["metrics"].items()},
                    relative_cost=row["relative_cost"],
                    rate_limit=rule.rate,
                    quota=rule.quota,
                    on_exhausted=None
                    if exhausted is None
                    else exhausted
                    if isinstance(exhausted, str)
                    else f"downgrade to {exhausted.downgrade}",
                    served_now=served_now,
                )
            )
        return TiersResponse(
            task=served.task,
            model=served.model.model_name,
            tiers=rows,
            brownout=status["brownout"],
            schedules_in_force=status["schedules_in_force"],
            priority=status["priority"],
        )

    @app.get("/v1/key", response_model=KeyInfo, responses=_ERRORS, tags=["tiers"])
    async def key_info(principal: Principal = Depends(auth.identify)) -> JSONResponse:
        """The calling key: its own tier, the tier a request is served at now, and why."""
        record = principal.key
        decision = principal.decision
        info = KeyInfo(
            id=record.id,
            name=record.name,
            tier=decision.key_tier if decision is not None else principal.tier,
            served_tier=principal.tier,
            reasons=list(decision.reasons) if decision is not None else [],
            owner=record.owner,
        )
        return JSONResponse(info.model_dump(), headers=principal.headers)

    # --- policy (owner keys) -------------------------------------------------------------------
    @app.get("/v1/policy", responses=_ERRORS, tags=["policy"])
    async def policy_status(principal: Principal = Depends(auth.identify)) -> dict[str, Any]:
        """Owner keys only: the policy in force, its source, the brownout state and signals."""
        auth.require_owner(principal, "reading the policy")
        return engine.status()

    @app.post("/v1/policy/reload", responses=_ERRORS, tags=["policy"])
    async def policy_reload(principal: Principal = Depends(auth.identify)) -> dict[str, Any]:
        """Owner keys only: re-read the policy file; a bad file is refused (422, with its line)
        and the policy in force stays."""
        auth.require_owner(principal, "reloading the policy")
        try:
            await run_in_threadpool(reload_policy)
        except PolicyError as err:
            raise ApiError(
                422, "invalid_policy", f"{err}; the policy in force is unchanged"
            ) from err
        return engine.status()

    @app.get("/v1/owner/stats", responses=_ERRORS, tags=["policy"])
    async def owner_stats(
        principal: Principal = Depends(auth.identify),
        minutes: int = Query(180, ge=1, le=24 * 60, description="History length."),
    ) -> dict[str, Any]:
        """Owner keys only: requests and downgrades per tier per minute (this process), the
        brownout state and every key (stub only) with its usage."""
        auth.require_owner(principal, "the owner statistics")
        return {
            "history": engine.history.series(minutes),
            "status": engine.status(),
            "keys": await run_in_threadpool(_key_usage, store, usage),
        }

    # --- inference ---------------------------------------------------------------------------
    @app.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        responses=_ERRORS,
        openapi_extra=IMAGE_BODY_DOC,
        dependencies=[Depends(serves(CLASSIFICATION))],
        tags=["inference"],
    )
    async def classify(
        request: Request,
        principal: Principal = Depends(auth),
        top_k: int | None = Query(None, ge=1, le=1000, description="Classes to return."),
    ) -> JSONResponse:
        """Classify one image (multipart field `image`, JSON `{"image": BASE64}` or raw bytes)."""
        x, _, options = await image_input(request)
        k = top_k_of(top_k, options)
        output = await batcher.submit(x, principal.tier)
        return _answer(classify_answer(served, output, principal.tier, k), principal)

    @app.post(
        "/v1/segment",
        response_model=SegmentResponse,
        response_model_exclude_none=True,
        responses=_ERRORS,
        openapi_extra=IMAGE_BODY_DOC,
        dependencies=[Depends(serves(SEGMENTATION))],
        tags=["inference"],
    )
    async def segment(
        request: Request,
        principal: Principal = Depends(auth),
        format: str | None = Query(None, pattern="^(png|rle)$", description="Mask encoding."),
    ) -> JSONResponse:
        """Segment one image; the class mask comes back at the image's size, as PNG or RLE."""
        x, size, options = await image_input(request)
        fmt = mask_format(format, options)
        output = await batcher.submit(x, principal.tier)
        return _answer(segment_answer(served, output, principal.tier, size, fmt), principal)

    @app.post(
        "/v1/generate",
        response_model=GenerateResponse,
        responses=_ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": GenerateRequest.model_json_schema()}},
            }
        },
        dependencies=[Depends(serves(*TEXT_TO_IMAGE))],
        tags=["inference"],
    )
    async def generate(request: Request, principal: Principal = Depends(auth)) -> Response:
        """Generate an image from a prompt (JSON `{"prompt": "...", "seed": 7}`): base64 PNG in
        JSON, or the PNG itself with `Accept: image/png`. Without a seed, one is derived from
        the key and the prompt, so a repeated request gives the same image."""
        body = await read_prompt(request, config.max_body_bytes, config.max_prompt_chars)
        sample, seed = prompt_sample(body, principal)
        output = await batcher.submit(sample, principal.tier)
        answer = generate_answer(output, principal.tier, body.prompt, seed)
        if "image/png" in request.headers.get("accept", ""):
            headers = {
                **principal.headers,
                TIER_HEADER: answer.tier,
                **({"X-Seed": str(seed)} if seed is not None else {}),
            }
            return Response(generated_png(output), media_type="image/png", headers=headers)
        return _answer(answer, principal)

    @app.post(
        "/v1/compare",
        response_model=CompareResponse,
        response_model_exclude_none=True,
        responses=_ERRORS,
        openapi_extra=IMAGE_BODY_DOC,
        tags=["inference"],
    )
    async def compare(
        request: Request,
        principal: Principal = Depends(auth.identify),
        top_k: int | None = Query(None, ge=1, le=1000),
        format: str | None = Query(None, pattern="^(png|rle)$"),
    ) -> CompareResponse:
        """Owner keys only: run the same input at every tier, side by side."""
        auth.require_owner(principal)
        if served.task in TEXT_TO_IMAGE:
            body = await read_prompt(request, config.max_body_bytes, config.max_prompt_chars)
            sample, seed = prompt_sample(body, principal)  # one seed: tiers side by side
            outputs = await asyncio.gather(*(batcher.submit(sample, t) for t in tiers))
            results: list[Any] = [
                generate_answer(o, t, body.prompt, seed)
                for o, t in zip(outputs, tiers, strict=True)
            ]
            return CompareResponse(task=served.task, results=results)
        x, size, options = await image_input(request)
        outputs = await asyncio.gather(*(batcher.submit(x, t) for t in tiers))
        if served.task == SEGMENTATION:
            fmt = mask_format(format, options)
            results = [
                segment_answer(served, o, t, size, fmt) for o, t in zip(outputs, tiers, strict=True)
            ]
        else:
            k = top_k_of(top_k, options)
            results = [
                classify_answer(served, o, t, k, owner=True)
                for o, t in zip(outputs, tiers, strict=True)
            ]
        return CompareResponse(task=served.task, results=results)

    return app


_ENDPOINTS = {CLASSIFICATION: "POST /v1/classify", SEGMENTATION: "POST /v1/segment"} | {
    task: "POST /v1/generate" for task in TEXT_TO_IMAGE
}


def _answer(
    answer: ClassifyResponse | SegmentResponse | GenerateResponse, principal: Principal
) -> Any:
    """The answer as JSON with the ``X-Tier`` header and the policy's headers (key tier, reason,
    rate limit); already validated, so FastAPI's response pass is skipped."""
    body = answer.model_dump(exclude_none=True)
    return JSONResponse(body, headers={**principal.headers, TIER_HEADER: answer.tier})


def _reload_logged(reload: Callable[[], Policy]) -> None:
    """SIGHUP: reload the policy; a bad file is reported and the old policy stays."""
    import logging

    log = logging.getLogger("nnobfuscator.serving")
    try:
        fresh = reload()
    except PolicyError as err:
        log.error("policy not reloaded (the policy in force is unchanged): %s", err)
    else:
        log.info("policy reloaded from %s", fresh.source)


def _usage_meter(store: KeyStore, config: ServeConfig) -> UsageMeter:
    """The usage meter: in Redis when limits are shared there, else in the key store's file."""
    redis_url = config.limits_store if config.limits_store.startswith("redis") else None
    return usage_meter(store.path, redis_url)


def _key_usage(store: KeyStore, usage: UsageMeter) -> list[dict[str, Any]]:
    """Every key as the owner page lists it: stub, tier, status and requests per tier (7 days)."""
    totals: dict[str, dict[str, int]] = {}
    with contextlib.suppress(Exception):  # show what is stored even if the buffer cannot go
        usage.flush()
    for row in usage.rows(None, 7):
        per_tier = totals.setdefault(row.key_id, {})
        per_tier[row.tier] = per_tier.get(row.tier, 0) + row.requests
    keys = []
    now = store.now()
    for record in sorted(store.list_keys(), key=lambda r: (r.name or "~", r.created_at, r.id)):
        keys.append(
            {
                "stub": record.stub,
                "name": record.name,
                "tier": record.tier,
                "owner": record.owner,
                "status": record.status(now),
                "expires_at": record.expires_at,
                "requests_7d": totals.get(record.id, {}),
            }
        )
    return keys


def _forward(model: TieredModel, batch: Any, tiers: list[str]) -> Any:
    """One call with a tier per sample (images or prompts); the executor groups by tier."""
    return model(batch, tiers=tiers)
