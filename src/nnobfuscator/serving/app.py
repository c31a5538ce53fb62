"""The HTTP service: ``create_app()`` builds one FastAPI app for uvicorn or Ray Serve.

Every request's API key picks its tier; requests are micro-batched across tiers into one forward
pass with a tier per sample (``model(x, tiers=[...])``), so no request can see another's tier.
The routes live in :mod:`nnobfuscator.serving.routes`, one router per concern; what they share is
one :class:`~nnobfuscator.serving.state.Serving` on ``app.state.serving``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from nnobfuscator.serving.api_keys import KeyStore
from nnobfuscator.serving.auth import Authenticator
from nnobfuscator.serving.batcher import MicroBatcher
from nnobfuscator.serving.config import ServeConfig
from nnobfuscator.serving.errors import install_error_handlers
from nnobfuscator.serving.generation_batcher import GenerationBatcher
from nnobfuscator.serving.limiter import LimitStore
from nnobfuscator.serving.load_signals import LoadMonitor
from nnobfuscator.serving.metrics import Metrics
from nnobfuscator.serving.middleware import ServingMiddleware
from nnobfuscator.serving.policy import Policy, PolicyError, default_policy, load_policy, utc_now
from nnobfuscator.serving.policy_engine import PolicyEngine
from nnobfuscator.serving.routes import completions, inference, owner, service, tiers
from nnobfuscator.serving.served_model import ServedModel, load_artifact, serve_model
from nnobfuscator.serving.state import TEXT_GENERATION, TIER_HEADER, Serving
from nnobfuscator.serving.usage import usage_meter
from nnobfuscator.tiered.model import TieredModel
from nnobfuscator.version import __version__

__all__ = ["TIER_HEADER", "create_app"]


def create_app(
    model: TieredModel | ServedModel | str | Path,
    *,
    keys: KeyStore | str | Path | None = None,
    config: ServeConfig | None = None,
    policy: Policy | str | Path | None = None,
    clock: Callable[[], datetime] = utc_now,
    tokenizer: Any = None,
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
        tokenizer: a text-generation model's tokenizer (``/v1/completions``,
            ``/v1/chat/completions``); an artifact brings its own from ``<artifact>/tokenizer``.

    Example:
        >>> app = create_app("runs/resnet18-feature-mix", keys="keys.sqlite")
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    if isinstance(model, ServedModel):
        served = model
    elif isinstance(model, TieredModel):
        served = serve_model(model, tokenizer=tokenizer)
    else:
        served = load_artifact(model)
    if tokenizer is not None:
        served.tokenizer = tokenizer
    store = keys if isinstance(keys, KeyStore) else KeyStore(keys)
    config = config or ServeConfig()
    metrics = Metrics()
    names = served.model.tier_names
    policy_path = None if policy is None or isinstance(policy, Policy) else Path(policy)
    if policy is None:  # with a policy file, its rules replace config's limits
        policy = default_policy(names, config.rate_limits, config.token_quotas)
    elif policy_path is not None:
        policy = load_policy(policy_path, names)
    load = LoadMonitor(depth=lambda: batcher.pending + (generation.pending if generation else 0))
    engine = PolicyEngine(policy, LimitStore(config.limits_store), load, clock)

    def rank(tier: str) -> int:
        return names.index(tier) if engine.policy.spec.priority else 0

    def on_batch(batch_tiers: list[str], seconds: float) -> None:
        metrics.record_batch(batch_tiers, seconds)
        load.record_batch(seconds)

    batcher = MicroBatcher(
        lambda batch, batch_tiers: served.model(batch, tiers=batch_tiers),
        max_batch_size=config.max_batch_size,
        max_wait_ms=config.max_wait_ms,
        on_batch=on_batch,
        on_wait=load.record_wait,
        rank=rank,
        cost=lambda tier: served.model.get_tier(tier).relative_cost or 1.0,
        preempt_ms=config.preempt_ms,
    )
    generation = None
    if served.task == TEXT_GENERATION:  # completions share generate() calls
        generation = GenerationBatcher(
            served.model.generate,
            pad_token_id=served.pad_token_id,
            eos_token_ids=served.eos_token_ids,
            share_key=served.model.executor.pass_key,
            max_batch_size=config.max_batch_size,
            max_wait_ms=config.generation_wait_ms,
            on_batch=on_batch,
            on_wait=load.record_wait,
        )
    redis_url = config.limits_store if config.limits_store.startswith("redis") else None
    usage = usage_meter(store.path, redis_url)  # in Redis when limits are shared there

    def reload_policy() -> Policy:
        """Re-read the policy file; a bad one raises :class:`PolicyError` and the old stays."""
        if policy_path is None:
            raise PolicyError("this server was started without --policy; nothing to reload")
        fresh = load_policy(policy_path, names)
        engine.reload(fresh)
        return fresh

    state = Serving(
        served=served,
        store=store,
        config=config,
        metrics=metrics,
        batcher=batcher,
        engine=engine,
        usage=usage,
        auth=Authenticator(store, names, engine, metrics, usage),
        clock=clock,
        reload_policy=reload_policy,
        generation=generation,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        if policy_path is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signal.SIGHUP, _reload_logged, reload_policy)
        usage.start_background_flush()
        yield
        await batcher.aclose()
        if generation is not None:
            await generation.aclose()
        with contextlib.suppress(Exception):  # a store that is down loses only the last second
            usage.stop()

    app = FastAPI(
        title="nnobfuscator",
        version=__version__,
        summary=f"Tiered {served.task} model {served.model.model_name!r}: the API key picks the "
        f"tier ({', '.join(names)}).",
        description="Send the key as `Authorization: Bearer KEY` or `X-API-Key: KEY`. Every "
        f"answer names the tier that produced it, in the body and the `{TIER_HEADER}` header.",
        lifespan=lifespan,
    )
    app.state.serving = state
    # the pieces by name, as before the routers (tests and embedding code read them)
    app.state.served, app.state.keys, app.state.config = served, store, config
    app.state.metrics, app.state.batcher = metrics, batcher
    app.state.engine, app.state.usage, app.state.reload_policy = engine, usage, reload_policy
    install_error_handlers(app)
    app.add_middleware(ServingMiddleware, metrics=metrics, max_body_bytes=config.max_body_bytes)
    app.mount("/static", StaticFiles(directory=str(service.STATIC)), name="static")
    for router in (
        service.router,
        tiers.router,
        owner.router,
        inference.router,
        completions.router,
    ):
        app.include_router(router)
    return app


def _reload_logged(reload: Callable[[], Policy]) -> None:
    """SIGHUP: reload the policy; a bad file is reported and the old policy stays."""
    log = logging.getLogger("nnobfuscator.serving")
    try:
        fresh = reload()
    except PolicyError as err:
        log.error("policy not reloaded (the policy in force is unchanged): %s", err)
    else:
        log.info("policy reloaded from %s", fresh.source)
