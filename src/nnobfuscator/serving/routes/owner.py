"""Owner keys only: the policy in force, reloading it, and traffic statistics."""

from __future__ import annotations

import contextlib
from typing import Any

from fastapi import APIRouter, Depends, Query
from starlette.concurrency import run_in_threadpool

from nnobfuscator.serving.api_keys import KeyStore
from nnobfuscator.serving.auth import Principal
from nnobfuscator.serving.errors import ApiError
from nnobfuscator.serving.policy import PolicyError
from nnobfuscator.serving.state import ERRORS, Serving, identified, serving
from nnobfuscator.serving.usage import UsageMeter

router = APIRouter(tags=["policy"], responses=ERRORS)


@router.get("/v1/policy")
async def policy_status(
    principal: Principal = Depends(identified), state: Serving = Depends(serving)
) -> dict[str, Any]:
    """Owner keys only: the policy in force, its source, the brownout state and signals."""
    state.auth.require_owner(principal, "reading the policy")
    return state.engine.status()


@router.post("/v1/policy/reload")
async def policy_reload(
    principal: Principal = Depends(identified), state: Serving = Depends(serving)
) -> dict[str, Any]:
    """Owner keys only: re-read the policy file; a bad file is refused (422, with its line) and
    the policy in force stays."""
    state.auth.require_owner(principal, "reloading the policy")
    try:
        await run_in_threadpool(state.reload_policy)
    except PolicyError as err:
        raise ApiError(422, "invalid_policy", f"{err}; the policy in force is unchanged") from err
    return state.engine.status()


@router.get("/v1/owner/stats")
async def owner_stats(
    principal: Principal = Depends(identified),
    state: Serving = Depends(serving),
    minutes: int = Query(180, ge=1, le=24 * 60, description="History length."),
) -> dict[str, Any]:
    """Owner keys only: requests and downgrades per tier per minute (this process), the
    brownout state and every key (stub only) with its usage."""
    state.auth.require_owner(principal, "the owner statistics")
    return {
        "history": state.engine.history.series(minutes),
        "status": state.engine.status(),
        "keys": await run_in_threadpool(key_usage, state.store, state.usage),
    }


def key_usage(store: KeyStore, usage: UsageMeter) -> list[dict[str, Any]]:
    """Every key as the owner page lists it: stub, tier, status, and requests and tokens (text
    generation) per tier over 7 days."""
    totals: dict[str, dict[str, int]] = {}
    tokens: dict[str, dict[str, int]] = {}
    with contextlib.suppress(Exception):  # show what is stored even if the buffer cannot go
        usage.flush()
    for row in usage.rows(None, 7):
        per_tier = totals.setdefault(row.key_id, {})
        per_tier[row.tier] = per_tier.get(row.tier, 0) + row.requests
        if row.tokens:
            used = tokens.setdefault(row.key_id, {})
            used[row.tier] = used.get(row.tier, 0) + row.tokens
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
                "tokens_7d": tokens.get(record.id, {}),
            }
        )
    return keys
