"""The serving policy: validation with line numbers, quotas that downgrade, schedules at their
window edges, brownout with hysteresis, priority batching, reloads that keep a good policy."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from nnobfuscator.serving import KeyStore, ServeConfig, create_app
from nnobfuscator.serving.batcher import MicroBatcher
from nnobfuscator.serving.config import RateLimit
from nnobfuscator.serving.errors import ApiError
from nnobfuscator.serving.limiter import LimitStore, parse_token_quotas
from nnobfuscator.serving.load_signals import BrownoutSwitch, LoadMonitor
from nnobfuscator.serving.policy import PolicyError, default_policy, parse_policy
from nnobfuscator.serving.policy_engine import Caller, PolicyEngine
from nnobfuscator.serving.testing import random_png, serve_in_thread, torchvision_artifact

TIERS = ["free", "pro", "premium"]


class Clock:
    """A settable UTC clock."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def engine_for(text: str, *, depth=lambda: 0, clock=None) -> PolicyEngine:
    policy = parse_policy(text, TIERS)
    return PolicyEngine(
        policy,
        LimitStore("memory://"),
        LoadMonitor(depth=depth),
        clock or Clock(datetime(2026, 11, 27, 12, 0, tzinfo=UTC)),
    )


def caller(tier: str, key_id: str = "k1", asked: str | None = None) -> Caller:
    return Caller(key_id, None, tier, asked or tier)


# --- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("tiers:\n  free:\n    rate: 60/min\n  gold:\n    rate: 1/s\n", 4, "unknown tier 'gold'"),
        ("tiers:\n  free:\n    quota: lots/day\n", 3, "lots/day"),
        ("tiers:\n  pro:\n    quota: 5/day\n    on_exhausted: {downgrade: premium}\n", 4, "lower"),
        ("tiers:\n  pro:\n    rate: 5/min\n    colour: red\n", 4, "colour"),
        (
            "brownout:\n  signal: queue_depth\n  above: 10\n  below: 20\n  serve: {pro: free}\n",
            1,
            "below",
        ),
        (
            "brownout:\n  signal: queue_depth\n  above: 10\n  below: 2\n"
            "  serve:\n    free: premium\n",
            6,
            "higher",
        ),
        ("schedules:\n  - name: night\n    from: '25:00'\n    serve: {free: pro}\n", 3, "HH:MM"),
        ("tiers:\n  free: [unclosed\n", None, "not valid YAML"),
    ],
)
def test_bad_policy_names_its_line(text, line, words):
    with pytest.raises(PolicyError) as info:
        parse_policy(text, TIERS, source="p.yaml")
    message = str(info.value)
    assert words in message
    if line is not None:
        assert info.value.line == line
        assert f"p.yaml, line {line}" in message
    else:
        assert info.value.line is not None  # YAML errors carry their line too


# --- quotas ---------------------------------------------------------------------------------------
def test_quota_downgrades_after_exactly_n_requests():
    engine = engine_for("tiers:\n  pro:\n    quota: 4/day\n    on_exhausted: {downgrade: free}\n")
    served = [engine.decide(caller("pro")) for _ in range(6)]
    assert [d.tier for d in served] == ["pro"] * 4 + ["free"] * 2
    assert served[3].reasons == () and served[4].reasons == ("quota",)
    assert served[4].headers["X-Tier-Reason"] == "quota"
    assert served[4].headers["X-Key-Tier"] == "pro"
    assert served[2].headers["X-Quota-Remaining"] == "1"
    # another key has its own quota
    assert engine.decide(caller("pro", key_id="k2")).tier == "pro"


def test_quota_reject_and_rate_limit_answer_429_with_retry_after():
    engine = engine_for(
        "tiers:\n  free:\n    quota: 2/day\n    on_exhausted: reject\n  pro:\n    rate: 3/min\n"
    )
    for _ in range(2):
        engine.decide(caller("free"))
    with pytest.raises(ApiError) as info:
        engine.decide(caller("free"))
    assert info.value.status == 429 and info.value.code == "quota_exhausted"
    assert int(info.value.headers["Retry-After"]) >= 1
    states = [engine.decide(caller("pro", key_id="p")) for _ in range(3)]
    assert [s.headers["RateLimit-Remaining"] for s in states] == ["2", "1", "0"]
    assert states[0].headers["RateLimit-Limit"] == "3"
    with pytest.raises(ApiError) as info:
        engine.decide(caller("pro", key_id="p"))
    assert info.value.code == "rate_limited" and 1 <= int(info.value.headers["Retry-After"]) <= 60


def test_none_lifts_a_default_limit_for_a_tier_or_a_key():
    engine = engine_for(
        "tiers:\n  '*': {rate: 1/min}\n  premium: {rate: none}\nkeys:\n  bot: {rate: unlimited}\n"
    )
    assert [engine.decide(caller("premium")).tier for _ in range(3)] == ["premium"] * 3
    bot = Caller("b1", "bot", "free", "free")
    assert [engine.decide(bot).tier for _ in range(3)] == ["free"] * 3
    engine.decide(caller("pro"))
    with pytest.raises(ApiError):
        engine.decide(caller("pro"))


def test_key_rule_overrides_its_tier_rule_by_name():
    engine = engine_for(
        "tiers:\n  free: {quota: 1/day, on_exhausted: reject}\nkeys:\n  alice: {quota: 3/day}\n"
    )
    alice = Caller("a1", "alice", "free", "free")
    assert [engine.decide(alice).tier for _ in range(3)] == ["free"] * 3
    with pytest.raises(ApiError):
        engine.decide(alice)


# --- schedules ------------------------------------------------------------------------------------
def test_schedule_switches_at_the_window_edges():
    clock = Clock(datetime(2026, 11, 28, 9, 59, 59, tzinfo=UTC))  # a Saturday
    engine = engine_for(
        "schedules:\n  - name: promo\n    days: [sat]\n    from: '10:00'\n    to: '11:00'\n"
        "    serve: {free: pro}\n",
        clock=clock,
    )
    assert engine.decide(caller("free")).tier == "free"
    clock.now = datetime(2026, 11, 28, 10, 0, 0, tzinfo=UTC)
    decision = engine.decide(caller("free"))
    assert (decision.tier, decision.reasons) == ("pro", ("schedule",))
    clock.now = datetime(2026, 11, 28, 10, 59, 59, tzinfo=UTC)
    assert engine.decide(caller("free")).tier == "pro"
    clock.now = datetime(2026, 11, 28, 11, 0, 0, tzinfo=UTC)
    assert engine.decide(caller("free")).tier == "free"
    clock.now = datetime(2026, 11, 29, 10, 30, tzinfo=UTC)  # Sunday: not in the window
    assert engine.decide(caller("free")).tier == "free"
    assert engine.decide(caller("pro")).tier == "pro"  # tiers not named are untouched


def test_schedule_past_midnight_belongs_to_its_start_day():
    policy = parse_policy(
        "schedules:\n  - {name: night, days: [fri], from: '22:00', to: '06:00', "
        "serve: {free: pro}}\n",
        TIERS,
    )
    friday = datetime(2026, 11, 27, tzinfo=UTC)
    at = [friday + timedelta(hours=h) for h in (21, 22, 23, 29, 30, 46)]
    assert [policy.scheduled("free", t) for t in at] == [None, "pro", "pro", "pro", None, None]


def test_owner_history_counts_scheduled_downgrades_as_moved_but_not_upgrades():
    engine = engine_for(
        "schedules:\n  - {name: promo, serve: {free: pro, premium: pro}}\n",
    )
    assert engine.decide(caller("free")).tier == "pro"
    assert engine.decide(caller("premium")).tier == "pro"
    counts = engine.history.series(1)["tiers"]["pro"]
    assert sum(counts["requests"]) == 2 and sum(counts["schedule"]) == 1


# --- brownout -------------------------------------------------------------------------------------
def test_brownout_has_hysteresis_and_never_touches_unnamed_tiers():
    depth = {"now": 0}
    engine = engine_for(
        "brownout:\n  signal: queue_depth\n  above: 50\n  below: 10\n"
        "  serve: {pro: free, free: free}\n",
        depth=lambda: depth["now"],
    )
    served = []
    for value in (0, 60, 30, 9, 30):
        depth["now"] = value
        served.append(engine.decide(caller("pro")).tier)
        assert engine.decide(caller("premium")).tier == "premium"
    assert served == ["pro", "free", "free", "pro", "pro"]
    depth["now"] = 80
    decision = engine.decide(caller("pro"))
    assert decision.reasons == ("load",) and decision.headers["X-Tier-Reason"] == "load"
    assert engine.status()["brownout"]["active"] is True


def test_brownout_turns_off_only_after_the_signal_stayed_low_for_hold_s():
    now = {"t": 0.0}
    switch = BrownoutSwitch(clock=lambda: now["t"])
    states = []
    # on above 8; a dip to 2 at t=1 is too short; calm from t=3, off at t=6 (3 s held)
    for t, value in ((0, 9), (1, 2), (2, 5), (3, 1), (4, 0), (5.9, 2), (6, 2), (7, 5)):
        now["t"] = t
        states.append(switch.update(value, above=8, below=2, hold_s=3))
    assert states == [True, True, True, True, True, True, False, False]
    assert switch.state.changes == 2


def test_load_monitor_p95_covers_only_its_window():
    now = {"t": 0.0}
    monitor = LoadMonitor(window_s=10, clock=lambda: now["t"])
    for wait in range(1, 101):
        monitor.record_wait(wait / 1000)
    assert monitor.signals()["queue_wait_p95_ms"] == pytest.approx(95.0)
    now["t"] = 11.0
    assert monitor.signals()["queue_wait_p95_ms"] == 0.0


# --- priority -------------------------------------------------------------------------------------
def batches_run(
    first: str,
    waves: list[tuple[float, list[str]]],
    per_sample_s: float | None = None,
    **options,
) -> list[list[str]]:
    """The tiers of each batch a :class:`MicroBatcher` runs (each forward takes 50 ms, or
    ``per_sample_s`` per sample): a request at ``first``, then for each wave, after its delay,
    requests at its tiers."""
    import torch

    order: list[list[str]] = []

    def forward(batch, tiers):
        order.append(list(tiers))
        time.sleep(0.05 if per_sample_s is None else per_sample_s * len(tiers))
        return batch

    async def main() -> None:
        batcher = MicroBatcher(forward, max_wait_ms=1, rank=TIERS.index, **options)
        pending = [asyncio.ensure_future(batcher.submit(torch.zeros(1), first))]
        for delay, tiers in waves:
            await asyncio.sleep(delay)
            pending += [asyncio.ensure_future(batcher.submit(torch.zeros(1), t)) for t in tiers]
        await asyncio.gather(*pending)
        await batcher.aclose()

    asyncio.run(main())
    return order


def test_batcher_serves_higher_tiers_first_under_load():
    # the first batch is running while the rest queue up
    order = batches_run(
        "free",
        [(0.01, ["free", "free", "pro", "premium", "free", "premium"])],
        max_batch_size=2,
        starve_ms=10_000,
    )
    assert order[0] == ["free"]
    assert order[1] == ["premium", "premium"]
    assert order[2] == ["pro", "free"]
    assert sorted(t for batch in order for t in batch) == sorted(
        ["free"] * 4 + ["pro"] + ["premium"] * 2
    )


def test_batcher_under_load_batches_one_tier_by_its_cost():
    cost = {"free": 0.25, "pro": 0.5, "premium": 1.0}
    order = batches_run(
        "pro",
        [(0.01, ["free"] * 6 + ["premium"] * 3)],
        max_batch_size=2,
        cost=cost.get,
        starve_ms=10_000,
    )
    assert order == [["pro"], ["premium", "premium"], ["premium"], ["free"] * 6]


def test_a_higher_tier_cuts_into_a_cheap_batch_after_one_chunk():
    # 30 ms per sample: pro runs 0-30 ms; the 8 free requests form one batch by their cost, whose
    # first chunk (2 samples, the probe that measures free's time) runs 30-90 ms; premium arrives
    # at 50 ms and goes next; then free runs on in chunks of 2 (a 40 ms budget over 30 ms holds
    # one sample, but a chunk never holds fewer than max_batch_size)
    waves = [(0.005, ["free"] * 8), (0.045, ["premium"])]
    options = dict(max_batch_size=2, cost={"free": 0.25, "pro": 0.5, "premium": 1.0}.get)
    chunked = batches_run("pro", waves, per_sample_s=0.03, preempt_ms=40, **options)
    assert chunked == [["pro"], ["free"] * 2, ["premium"]] + [["free"] * 2] * 3
    whole = batches_run("pro", waves, per_sample_s=0.03, **options)
    assert whole == [["pro"], ["free"] * 8, ["premium"]]


def test_batcher_ages_waiting_requests_so_none_starves():
    # after 30 ms the free request has aged ranks past premium's
    order = batches_run(
        "pro", [(0.01, ["free"]), (0.03, ["premium"])], max_batch_size=1, starve_ms=5
    )
    assert order == [["pro"], ["free"], ["premium"]]


# --- over HTTP ------------------------------------------------------------------------------------
def test_http_quota_downgrade_headers_reload_and_owner_views(tmp_path):
    artifact = torchvision_artifact(tmp_path / "artifact")
    store = KeyStore(tmp_path / "keys.sqlite")
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(
        "tiers:\n  pro:\n    rate: 100/min\n    quota: 2/day\n    on_exhausted: {downgrade: free}\n"
    )
    app = create_app(artifact, keys=store, config=ServeConfig(max_wait_ms=5.0), policy=policy_file)
    pro = {"X-API-Key": store.create("pro")[1]}
    owner = {"X-API-Key": store.create(None, owner=True)[1]}
    image = {"files": {"image": ("x.png", random_png(0), "image/png")}}
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        answers = [client.post("/v1/classify", headers=pro, **image) for _ in range(3)]
        assert [r.status_code for r in answers] == [200, 200, 200]
        assert [r.headers["X-Tier"] for r in answers] == ["pro", "pro", "free"]
        assert [r.json()["tier"] for r in answers] == ["pro", "pro", "free"]
        assert answers[2].headers["X-Tier-Reason"] == "quota"
        assert answers[2].headers["X-Key-Tier"] == "pro"
        assert "X-Tier-Reason" not in answers[0].headers
        assert answers[0].headers["RateLimit-Limit"] == "100"
        assert answers[0].headers["RateLimit-Remaining"] == "99"

        tiers = client.get("/v1/tiers").json()
        pro_row = next(t for t in tiers["tiers"] if t["name"] == "pro")
        assert pro_row["quota"] == "2/day" and pro_row["on_exhausted"] == "downgrade to free"
        assert client.get("/v1/policy", headers=pro).status_code == 403

        # a bad file is refused with its line; the policy in force stays
        policy_file.write_text("tiers:\n  pro:\n    quota: 2/day\n  platinum:\n    rate: 1/s\n")
        refused = client.post("/v1/policy/reload", headers=owner)
        assert refused.status_code == 422
        assert "line 4" in refused.json()["detail"] and "platinum" in refused.json()["detail"]
        assert client.post("/v1/classify", headers=pro, **image).headers["X-Tier"] == "free"

        # a good one takes over without a restart
        policy_file.write_text("tiers:\n  pro:\n    quota: 1000/day\n")
        assert client.post("/v1/policy/reload", headers=owner).status_code == 200
        assert client.post("/v1/classify", headers=pro, **image).headers["X-Tier"] == "pro"

        stats = client.get("/v1/owner/stats", headers=owner, params={"minutes": 5}).json()
        counts = stats["history"]["tiers"]
        assert sum(counts["pro"]["requests"]) == 3 and sum(counts["free"]["quota"]) == 2
        assert stats["status"]["source"] == str(policy_file)
        assert all("…" in k["stub"] for k in stats["keys"])
        assert client.get("/v1/owner/stats", headers=pro).status_code == 403


def test_http_expired_and_rotated_keys_are_401_and_malformed_keys_skip_the_store(tmp_path):
    now = {"t": datetime(2026, 11, 27, 12, 0, tzinfo=UTC)}
    store = KeyStore(tmp_path / "keys.sqlite", clock=lambda: now["t"])
    app = create_app(torchvision_artifact(tmp_path / "artifact"), keys=store)
    _, expiring = store.create("pro", expires_in=timedelta(days=1))
    _, old = store.create("free", name="rotating")
    _, _, _ = store.rotate("rotating", grace=timedelta(hours=1))
    image = {"files": {"image": ("x.png", random_png(0), "image/png")}}
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:

        def code(key: str) -> tuple[int, str]:
            answer = client.post("/v1/classify", headers={"X-API-Key": key}, **image)
            return answer.status_code, answer.json().get("error", "")

        assert code(expiring)[0] == 200 and code(old)[0] == 200  # within expiry and grace
        now["t"] += timedelta(hours=2)
        assert code(old) == (401, "rotated_key")
        now["t"] += timedelta(days=1)
        assert code(expiring) == (401, "expired_key")
        store_reads = []
        original = store._connection
        store._connection = lambda: store_reads.append(1) or original()  # type: ignore[method-assign]
        assert code("nnobf_123456789abc_notavalidsecretwithoutchecksum")[0] == 401
        assert code("sk-something-else")[0] == 401
        assert store_reads == []


def test_http_limits_store_down_is_503_and_compare_needs_an_owner_before_counting(tmp_path):
    from nnobfuscator.serving.limiter import LimitStoreError

    store = KeyStore(tmp_path / "keys.sqlite")
    app = create_app(torchvision_artifact(tmp_path / "artifact"), keys=store)
    pro = {"X-API-Key": store.create("pro")[1]}
    image = {"files": {"image": ("x.png", random_png(0), "image/png")}}
    limits = app.state.engine.limits
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/v1/compare", headers=pro, **image).status_code == 403
        assert app.state.engine.history.series(1)["tiers"] == {}  # the 403 counted nothing

        def down(*args, **kwargs):
            raise LimitStoreError("cannot reach Redis at redis://127.0.0.1:1/0")

        limits.hit = down
        answer = client.post("/v1/classify", headers=pro, **image)
        assert answer.status_code == 503 and answer.json()["error"] == "limits_unavailable"
        assert answer.headers["Retry-After"] == "5"


# --- review fixes -----------------------------------------------------------------------------
def test_a_key_override_can_downgrade_and_a_downgrade_that_is_not_lower_rejects():
    engine = engine_for(
        "tiers:\n  pro: {quota: 1/day, on_exhausted: reject}\n"
        "  '*': {quota: 1/day, on_exhausted: {downgrade: premium}}\n"
        "keys:\n  alice: {on_exhausted: {downgrade: free}}\n"
    )
    alice = Caller("a1", "alice", "pro", "pro")
    assert [engine.decide(alice).tier for _ in range(2)] == ["pro", "free"]
    engine.decide(caller("free", key_id="f"))
    with pytest.raises(ApiError) as info:  # "downgrade" to a higher tier: the quota still holds
        engine.decide(caller("free", key_id="f"))
    assert info.value.code == "quota_exhausted"


def test_brownout_with_below_zero_turns_off_when_the_signal_is_zero():
    depth = {"now": 5}
    engine = engine_for(
        "brownout: {signal: queue_depth, above: 1, below: 0, serve: {pro: free}}\n",
        depth=lambda: depth["now"],
    )
    assert engine.decide(caller("pro")).tier == "free"
    depth["now"] = 0
    assert engine.decide(caller("pro")).tier == "pro"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("tiers:\n  free: {rate: 1/s}\n  free: {rate: 2/s}\n", "appears twice"),
        ("brownout: {above: 5, below: 1, serve: {}}\n", "at least 1"),
        ("schedules:\n  - {name: a, days: [], serve: {free: pro}}\n", "no days"),
        ("schedules:\n  - {name: a, from: '08:00', to: '08:00', serve: {free: pro}}\n", "empty"),
        ("schedules:\n  - {name: a, serve: {free: pro}}\n  - {name: a, serve: {pro: free}}\n", "a"),
        ("schedules:\n  - {name: a, from: 8:00, serve: {free: pro}}\n", "in quotes"),
        ("tiers:\n  free: {rate: 60}\n", "COUNT/PERIOD"),
        ("brownout: {above: 5, below: 1, hold_s: -1, serve: {pro: free}}\n", "hold_s"),
    ],
)
def test_more_bad_policies_are_refused(text, words):
    with pytest.raises(PolicyError, match=words):
        parse_policy(text, TIERS)


def test_default_policy_keeps_fractional_and_large_rates():
    from nnobfuscator.serving.config import parse_rate_limits
    from nnobfuscator.serving.policy import default_policy

    rules = default_policy(TIERS, parse_rate_limits("free=0.5/s,*=1000000/h")).spec.tiers
    assert rules["free"].rate == "1/2 seconds" and rules["*"].rate == "1000000/hour"


def test_a_batch_the_model_answers_wrongly_fails_its_requests_and_the_batcher_goes_on():
    import torch

    def forward(batch, tiers):
        return batch[:1] if len(tiers) == 2 else batch  # drops a row of two-sample batches

    async def main() -> tuple[list, object]:
        batcher = MicroBatcher(forward, max_batch_size=2, max_wait_ms=20)
        pair = await asyncio.gather(
            batcher.submit(torch.zeros(1), "free"),
            batcher.submit(torch.zeros(1), "pro"),
            return_exceptions=True,
        )
        alone = await batcher.submit(torch.ones(1), "free")
        await batcher.aclose()
        return pair, alone

    pair, alone = asyncio.run(main())
    assert all(isinstance(p, RuntimeError) for p in pair)
    assert torch.equal(alone, torch.ones(1))


def test_a_key_name_that_reads_like_an_id_is_refused(tmp_path):
    from nnobfuscator.serving.api_keys import KeyStoreError

    store = KeyStore(tmp_path / "k.sqlite")
    with pytest.raises(KeyStoreError, match="reads like a key id"):
        store.create("pro", name="0123456789ab")


def test_http_a_rotated_key_shares_its_replacements_limits_during_the_grace(tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite")
    policy = tmp_path / "policy.yaml"
    policy.write_text("tiers:\n  pro: {rate: 3/min}\nkeys:\n  alice: {rate: 2/min}\n")
    app = create_app(torchvision_artifact(tmp_path / "artifact"), keys=store, policy=policy)
    _, old = store.create("pro", name="alice")
    _, new, _ = store.rotate("alice", grace=timedelta(hours=1))
    image = {"files": {"image": ("x.png", random_png(0), "image/png")}}
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        codes = [
            client.post("/v1/classify", headers={"X-API-Key": key}, **image).status_code
            for key in (old, new, old)
        ]
    assert codes == [200, 200, 429]  # alice's 2/min, shared by the old and the new key


def test_token_quotas_from_the_command_line_and_a_policy_file():
    assert parse_token_quotas("free=20000/day, *=none") == {"free": "20000/day", "*": None}
    with pytest.raises(ValueError, match="invalid limit 'lots'"):
        parse_token_quotas("free=lots")
    tiers = ["free", "pro", "premium"]
    policy = default_policy(tiers, {"*": RateLimit(60, 60.0)}, {"free": "100/day"})
    assert (policy.rule("free").rate, policy.rule("free").token_quota) == ("60/min", "100/day")
    assert (policy.rule("pro").rate, policy.rule("pro").token_quota) == ("60/min", None)
    text = "tiers:\n  pro: {token_quota: 5000/day}\nkeys:\n  alice: {token_quota: none}\n"
    policy = parse_policy(text, tiers)
    assert policy.rule("pro").token_quota == "5000/day"
    assert policy.rule("pro", ("alice",)).token_quota is None
    with pytest.raises(PolicyError, match="line 2"):
        parse_policy("tiers:\n  pro: {token_quota: many}\n", tiers)


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_a_token_reservation_gives_back_what_it_did_not_use(store, request):
    uri = "memory://" if store == "memory" else request.getfixturevalue("redis_url")
    policy = parse_policy("tiers:\n  free: {token_quota: 50/day}\n", TIERS)
    engine = PolicyEngine(policy, LimitStore(uri), LoadMonitor(depth=lambda: 0))
    first = engine.reserve_tokens(caller("free"), 10, 30)
    assert first is not None and first.headers["X-Token-Quota-Remaining"] == "10"
    with pytest.raises(ApiError, match="10 tokens left and this request may use 40") as refused:
        engine.reserve_tokens(caller("free"), 10, 30)
    assert refused.value.status == 429 and refused.value.code == "token_quota_exhausted"
    engine.settle_tokens(first, 15)  # 25 of the 40 given back
    assert engine.reserve_tokens(caller("free"), 5, 30).headers["X-Token-Quota-Remaining"] == "0"
    assert engine.reserve_tokens(caller("pro"), 10**6, 1) is None  # pro has no token quota
    assert engine.reserve_tokens(Caller("o", None, "free", "free", owner=True), 10**6, 1) is None
