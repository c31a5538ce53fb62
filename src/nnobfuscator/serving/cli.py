"""``nnobf keys ...`` and ``nnobf serve``: typer commands registered by ``nnobfuscator.cli``.

Only typer, rich and sqlite load at import time (the serving stack and torch load inside
``serve``), so ``nnobf keys ...`` answers in a fraction of a second.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from nnobfuscator.serving.api_keys import ApiKey, KeyStore
from nnobfuscator.serving.key_database import default_keys_path
from nnobfuscator.serving.key_format import KeyStoreError, key_stub, parse_duration

if TYPE_CHECKING:
    from nnobfuscator.serving.usage import UsageMeter

keys_app = typer.Typer(
    help="Manage API keys: each key unlocks one tier (changes apply on the next request).",
    no_args_is_help=True,
)
# Wide enough for the key table when output is piped or captured (rich assumes 80 columns).
_out = Console(width=None if sys.stdout.isatty() else 160)
_err = Console(stderr=True, soft_wrap=True)

KeysOption = Annotated[
    Path | None,
    typer.Option("--keys", help="Key store (SQLite). Default: $NNOBF_HOME/keys.sqlite."),
]
UsageStoreOption = Annotated[
    str,
    typer.Option(
        "--limits-store",
        metavar="URI",
        help="Where the server meters usage (its --limits-store): redis://host:port/DB reads "
        "Redis; anything else reads the key store file.",
    ),
]


def _fail(message: str) -> None:
    _err.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code=2)


def _store(path: Path | None) -> KeyStore:
    return KeyStore(path)


def _duration(text: str, option: str) -> timedelta | None:
    try:
        return parse_duration(text)
    except KeyStoreError as err:
        _fail(f"{option}: {err}")
    raise AssertionError  # unreachable: _fail exits


def _meter(store: KeyStore, limits_store: str) -> UsageMeter:
    from nnobfuscator.serving.usage import usage_meter

    redis_url = limits_store if limits_store.startswith("redis") else None
    try:
        return usage_meter(store.path, redis_url)
    except ImportError:
        _fail("reading usage from Redis needs the redis package: pip install 'nnobfuscator[serve]'")
    raise AssertionError  # unreachable: _fail exits


def _when(text: str | None) -> str:
    """An ISO time as ``YYYY-MM-DD HH:MM`` (UTC), ``-`` for none."""
    return text[:16].replace("T", " ") if text else "-"


def _status(record: ApiKey) -> str:
    status = record.status()
    if status == "active" and record.replaced_by is not None:
        return f"active until {_when(record.retires_at)} (rotated to {record.replaced_by})"
    if status == "rotated":
        return f"rotated (to {record.replaced_by})"
    return status


def _print_created(kind: str, record: ApiKey, store: KeyStore) -> None:
    label = f" named {record.name!r}" if record.name else ""
    owner = "owner key" if record.owner else "key"
    expiry = f", expires {record.expires_at}" if record.expires_at else ""
    _err.print(
        f"{kind} {owner} {record.id}{label} for tier {record.tier or '(highest)'}{expiry} "
        f"in {store.path}"
    )
    _err.print("store it now: only a salted hash is kept")


@keys_app.command("create")
def create_key(
    tier: Annotated[
        str | None, typer.Option(help="Tier the key unlocks (e.g. pro). Owner keys may omit it.")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="A unique label, usable instead of the key.")
    ] = None,
    owner: Annotated[
        bool, typer.Option("--owner", help="Owner key: any tier per request, compare all tiers.")
    ] = False,
    expires: Annotated[
        str,
        typer.Option(help="Lifetime: a number and s, m/min, h or d (e.g. 30d), or 'never'."),
    ] = "never",
    keys: KeysOption = None,
) -> None:
    """Create a key; the key itself is printed alone on the last line (shown only once)."""
    lifetime = _duration(expires, "--expires")
    store = _store(keys)
    try:
        record, key = store.create(tier, name=name, owner=owner, expires_in=lifetime)
    except KeyStoreError as err:
        _fail(str(err))
    _print_created("created", record, store)
    print(key, flush=True)


@keys_app.command("rotate")
def rotate_key(
    key: Annotated[str, typer.Argument(help="The key itself, its name or its id.")],
    grace: Annotated[
        str, typer.Option(help="How long the old key keeps working (e.g. 24h, 0).")
    ] = "24h",
    expires: Annotated[
        str,
        typer.Option(
            help="The new key's lifetime (e.g. 30d), 'never', or 'same' (the old key's lifetime)."
        ),
    ] = "same",
    keys: KeysOption = None,
) -> None:
    """Replace a key: same tier, owner flag and name; the new key is printed on the last line.

    The old key keeps working until the grace period ends, then it is refused as rotated.
    """
    grace_period = _duration(grace, "--grace")
    if grace_period is None:
        _fail("--grace: give a duration such as 24h or 0 (a rotated key cannot work forever)")
    lifetime = "same" if expires.strip().lower() == "same" else _duration(expires, "--expires")
    store = _store(keys)
    try:
        record, new_key, old = store.rotate(key, grace=grace_period, expires_in=lifetime)
    except KeyStoreError as err:
        _fail(str(err))
    _print_created("created", record, store)
    _err.print(f"old key {old.id} keeps working until {old.retires_at}")
    print(new_key, flush=True)


@keys_app.command("list")
def list_keys(keys: KeysOption = None, limits_store: UsageStoreOption = "memory://") -> None:
    """List keys (stubs, names, tiers, times in UTC, status; secrets are never stored)."""
    store = _store(keys)
    records = store.list_keys()
    last_used = {}
    if limits_store.startswith("redis"):
        meter = _meter(store, limits_store)
        try:
            last_used = meter.last_used()
        finally:
            meter.close()
    table = Table(title=f"keys in {store.path}")
    for column in ("key", "name", "tier", "owner", "created", "last used", "expires", "status"):
        table.add_column(column, no_wrap=column == "key")
    for record in records:
        used = max(filter(None, (record.last_used_at, last_used.get(record.id))), default=None)
        table.add_row(
            record.stub,
            record.name or "-",
            record.tier or "(highest)",
            "yes" if record.owner else "",
            _when(record.created_at),
            _when(used),
            _when(record.expires_at) if record.expires_at else "never",
            _status(record),
        )
    _out.print(table)


@keys_app.command("set-tier")
def set_tier(
    key: Annotated[str, typer.Argument(help="The key itself, its name or its id.")],
    tier: Annotated[str, typer.Argument(help="The new tier.")],
    keys: KeysOption = None,
) -> None:
    """Move a key to another tier (the server applies it on the key's next request)."""
    try:
        record = _store(keys).set_tier(key, tier)
    except KeyStoreError as err:
        _fail(str(err))
    print(f"key {record.id} is now tier {record.tier}")


@keys_app.command("set-expiry")
def set_expiry(
    key: Annotated[str, typer.Argument(help="The key itself, its name or its id.")],
    expires: Annotated[
        str, typer.Argument(help="Lifetime from now (e.g. 30d, 12h, 0) or 'never'.")
    ],
    keys: KeysOption = None,
) -> None:
    """Set when a key expires, counted from now ('never' removes the expiry)."""
    lifetime = _duration(expires, "EXPIRES")
    try:
        record = _store(keys).set_expiry(key, lifetime)
    except KeyStoreError as err:
        _fail(str(err))
    print(f"key {record.id} expires {record.expires_at or 'never'}")


@keys_app.command("revoke")
def revoke(
    key: Annotated[str, typer.Argument(help="The key itself, its name or its id.")],
    keys: KeysOption = None,
) -> None:
    """Revoke a key (refused with 401 from its next request on)."""
    try:
        record = _store(keys).revoke(key)
    except KeyStoreError as err:
        _fail(str(err))
    print(f"key {record.id} revoked at {record.revoked_at}")


@keys_app.command("audit")
def audit(
    limit: Annotated[int, typer.Option(help="Show the latest N entries (0: all).")] = 50,
    key: Annotated[
        str | None, typer.Option(help="Only this key (the key, its name or its id).")
    ] = None,
    keys: KeysOption = None,
) -> None:
    """Show the append-only log of key changes (create, rotate, set-tier, set-expiry, revoke)."""
    store = _store(keys)
    try:
        key_id = store.find(key).id if key is not None else None
    except KeyStoreError as err:
        _fail(str(err))
    table = Table(title=f"key changes in {store.path} (UTC)")
    for column in ("at", "action", "key", "detail"):
        table.add_column(column, no_wrap=column != "detail")
    for row in store.audit(limit or None, key_id=key_id):
        table.add_row(row.at, row.action, key_stub(row.key_id) if row.key_id else "-", row.detail)
    _out.print(table)


@keys_app.command("usage")
def usage(
    key: Annotated[
        str | None, typer.Argument(help="One key (the key, its name or its id); default: all.")
    ] = None,
    days: Annotated[int, typer.Option(help="How many UTC days back, today included.")] = 7,
    keys: KeysOption = None,
    limits_store: UsageStoreOption = "memory://",
) -> None:
    """Requests per UTC day and tier, as metered by the server."""
    store = _store(keys)
    try:
        record = store.find(key) if key is not None else None
    except KeyStoreError as err:
        _fail(str(err))
    meter = _meter(store, limits_store)
    try:
        rows = meter.rows(record.id if record else None, days)
        day_list = sorted(meter.window(days))
    finally:
        meter.close()
    counts: dict[tuple[str, str], int] = {}
    tokens: dict[str, int] = {}
    for row in rows:
        counts[row.day, row.tier] = counts.get((row.day, row.tier), 0) + row.requests
        tokens[row.day] = tokens.get(row.day, 0) + row.tokens
    tiers = sorted({tier for _, tier in counts})
    who = f"key {record.stub}" if record else "all keys"
    table = Table(title=f"requests per UTC day and tier, {who}, last {days} days")
    with_tokens = any(tokens.values())  # a text-generation server's prompt + completion tokens
    for column in ("day", *tiers, "total", *(["tokens"] if with_tokens else [])):
        table.add_column(column, justify="left" if column == "day" else "right")
    for day in day_list:
        per_tier = [counts.get((day, tier), 0) for tier in tiers]
        spent = [str(tokens.get(day, 0))] if with_tokens else []
        table.add_row(day, *map(str, per_tier), str(sum(per_tier)), *spent)
    _out.print(table)
    if not rows:
        _err.print("no requests metered in that window")


def serve(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory (from demo/calibrate).")],
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    keys: KeysOption = None,
    max_batch_size: Annotated[int, typer.Option(help="Most requests per forward pass.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="Batch collection window (ms).")] = 2.0,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body (MiB).")] = 8.0,
    preempt_ms: Annotated[
        float,
        typer.Option(
            help="Under load, a cheaper tier's batch runs in chunks of about this long that a "
            "higher tier may cut between (0: run batches whole)."
        ),
    ] = 25.0,
    rate_limit: Annotated[
        str, typer.Option(help="Per-key limits by tier, e.g. 'free=60/min,*=600/min' or '*=none'.")
    ] = "*=600/min",
    token_quota: Annotated[
        str,
        typer.Option(
            help="Per-key prompt plus completion tokens by tier (text generation), e.g. "
            "'free=20000/day,*=none'."
        ),
    ] = "",
    max_tokens: Annotated[int, typer.Option(help="Most tokens one completion may make.")] = 512,
    limits_store: Annotated[
        str,
        typer.Option(
            "--limits-store",
            metavar="URI",
            help="where rate limits, quotas and usage live; redis://host:port to share them "
            "across processes or Ray Serve replicas",
        ),
    ] = "memory://",
    policy: Annotated[
        Path | None,
        typer.Option(
            help="Serving policy (YAML): quotas that downgrade, brownout under load, schedules, "
            "priority; its rules replace --rate-limit. Reload it with SIGHUP or "
            "POST /v1/policy/reload (owner key).",
        ),
    ] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Deploy with Ray Serve.")] = False,
    replicas: Annotated[int, typer.Option(help="Ray Serve replicas (with --ray).")] = 1,
    allow_weak: Annotated[
        bool,
        typer.Option(
            "--allow-weak", help="Serve an artifact whose strategy is known to fall to an attack."
        ),
    ] = False,
) -> None:
    """Serve an artifact over HTTP: the API key of each request picks its tier."""
    from nnobfuscator.serving.config import ServeConfig, parse_rate_limits
    from nnobfuscator.serving.limiter import parse_token_quotas

    try:
        config = ServeConfig(
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            max_body_bytes=int(max_body_mb * 1024 * 1024),
            preempt_ms=preempt_ms or None,
            rate_limits=parse_rate_limits(rate_limit),
            token_quotas=parse_token_quotas(token_quota),
            max_tokens=max_tokens,
            default_max_tokens=max(1, min(64, max_tokens)),
            limits_store=limits_store,
        )
    except ValueError as err:
        _fail(str(err))
    keys_path = (keys or default_keys_path()).resolve()
    if not (artifact / "config.json").is_file():
        _fail(f"{artifact} is not an artifact directory (no config.json); run `nnobf demo` first")
    weak = _weak_strategies(artifact)
    if weak and not allow_weak:
        _fail(
            f"{artifact} uses {', '.join(weak)}, a strategy known to be weak on a server: its "
            "answers change from call to call, so a user who repeats a query and votes gets the "
            f"full model's accuracy back (measure it: nnobf attack {artifact} --tier all). "
            "Calibrate with a keyed strategy (feature-mix, logit-noise), or pass --allow-weak to "
            "serve it anyway."
        )
    if weak:
        _err.print(
            f"[yellow]warning:[/] serving the weak strategy {', '.join(weak)} (--allow-weak)"
        )
    if policy is not None:
        _check_policy(artifact, policy)
    if ray:
        from nnobfuscator.serving.ray_app import run_ray

        if replicas < 1:
            _fail("--replicas must be at least 1")
        run_ray(
            artifact.resolve(),
            keys_path,
            config,
            host=host,
            port=port,
            replicas=replicas,
            policy=policy,
        )
        return
    import uvicorn

    from nnobfuscator.serving.app import create_app
    from nnobfuscator.serving.limiter import LimitStoreError

    try:
        app = create_app(artifact, keys=keys_path, config=config, policy=policy)
    except (ValueError, LimitStoreError) as err:
        _fail(str(err))
    _err.print(f"serving {artifact} on http://{host}:{port} (keys: {keys_path})")
    uvicorn.run(app, host=host, port=port, log_level="info")


def _check_policy(artifact: Path, policy: Path) -> None:
    """Refuse a bad policy file before anything starts (its line and what is wrong)."""
    from nnobfuscator.core.serialization import read_config
    from nnobfuscator.serving.policy import PolicyError, load_policy

    tiers = [t["name"] for t in read_config(artifact).get("tiers", [])]
    try:
        load_policy(policy, tiers)
    except PolicyError as err:
        _fail(str(err))


def _weak_strategies(artifact: Path) -> list[str]:
    """The artifact's strategies marked ``weak`` (unknown names are left to the loader)."""
    from nnobfuscator.core.serialization import read_config
    from nnobfuscator.strategies.base import STRATEGIES

    try:
        config = read_config(artifact)
    except ValueError as err:
        _fail(str(err))
    names = [spec.get("name") for spec in config.get("strategies", [])]
    return [n for n in names if n in STRATEGIES and STRATEGIES.get(n).weak]
