"""The served model's tiers with the policy in force, and the calling key."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from nnobfuscator.serving.auth import Principal
from nnobfuscator.serving.schemas import KeyInfo, TierInfo, TiersResponse
from nnobfuscator.serving.state import ERRORS, Serving, identified, serving

router = APIRouter(tags=["tiers"])


@router.get("/v1/tiers", response_model=TiersResponse)
async def list_tiers(state: Serving = Depends(serving)) -> TiersResponse:
    """The tiers of the served model, lowest first, with their measured metrics and the policy
    in force (limits, quotas, brownout, schedules)."""
    rows = []
    current = state.engine.policy
    status = state.engine.status()
    browned = bool(status["brownout"] and status["brownout"]["active"])
    now = state.clock()
    brownout = current.spec.brownout
    for row in state.served.model.status():
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
                full=state.served.model.get_tier(name).is_full,
                metrics={k: float(v) for k, v in row["metrics"].items()},
                relative_cost=row["relative_cost"],
                rate_limit=rule.rate,
                quota=rule.quota,
                token_quota=rule.token_quota,
                on_exhausted=None
                if exhausted is None
                else exhausted
                if isinstance(exhausted, str)
                else f"downgrade to {exhausted.downgrade}",
                served_now=served_now,
            )
        )
    return TiersResponse(
        task=state.served.task,
        model=state.served.model.model_name,
        tiers=rows,
        brownout=status["brownout"],
        schedules_in_force=status["schedules_in_force"],
        priority=status["priority"],
    )


@router.get("/v1/key", response_model=KeyInfo, responses=ERRORS)
async def key_info(principal: Principal = Depends(identified)) -> JSONResponse:
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
