"""``nnobf keys ...`` and ``nnobf serve``: typer commands registered by ``nnobfuscator.cli``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from nnobfuscator.serving.keystore import KeyStore, KeyStoreError, default_keys_path

keys_app = typer.Typer(
    help="Manage API keys: each key unlocks one tier (changes apply on the next request).",
    no_args_is_help=True,
)
_out = Console(soft_wrap=True)
_err = Console(stderr=True, soft_wrap=True)

KeysOption = Annotated[
    Path | None,
    typer.Option("--keys", help="Key store (SQLite). Default: $NNOBF_HOME/keys.sqlite."),
]


def _fail(message: str) -> None:
    _err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


def _store(path: Path | None) -> KeyStore:
    return KeyStore(path)


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
    keys: KeysOption = None,
) -> None:
    """Create a key; the key itself is printed alone on the last line (shown only once)."""
    store = _store(keys)
    try:
        record, key = store.create(tier, name=name, owner=owner)
    except KeyStoreError as err:
        _fail(str(err))
    label = f" named {record.name!r}" if record.name else ""
    kind = "owner key" if record.owner else "key"
    _err.print(
        f"created {kind} {record.id}{label} for tier {record.tier or '(highest)'} in {store.path}"
    )
    _err.print("store it now: only a salted hash is kept")
    print(key, flush=True)


@keys_app.command("list")
def list_keys(keys: KeysOption = None) -> None:
    """List keys (ids, names, tiers, status; secrets are never stored)."""
    store = _store(keys)
    table = Table(title=f"keys in {store.path}")
    for column in ("id", "name", "tier", "owner", "created", "status"):
        table.add_column(column)
    for record in store.list_keys():
        table.add_row(
            record.id,
            record.name or "-",
            record.tier or "(highest)",
            "yes" if record.owner else "",
            record.created_at,
            f"revoked {record.revoked_at}" if record.revoked else "active",
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


def serve(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory (from demo/calibrate).")],
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    keys: KeysOption = None,
    max_batch_size: Annotated[int, typer.Option(help="Most requests per forward pass.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="Batch collection window (ms).")] = 2.0,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body (MiB).")] = 8.0,
    rate_limit: Annotated[
        str, typer.Option(help="Per-key limits by tier, e.g. 'free=60/min,*=600/min' or '*=none'.")
    ] = "*=600/min",
    limits_store: Annotated[
        str,
        typer.Option(
            "--limits-store",
            metavar="URI",
            help="where rate limits, quotas and usage live; redis://host:port to share them "
            "across processes or Ray Serve replicas",
        ),
    ] = "memory://",
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

    try:
        config = ServeConfig(
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            max_body_bytes=int(max_body_mb * 1024 * 1024),
            rate_limits=parse_rate_limits(rate_limit),
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
    if ray:
        from nnobfuscator.serving.ray_app import run_ray

        if replicas < 1:
            _fail("--replicas must be at least 1")
        run_ray(artifact.resolve(), keys_path, config, host=host, port=port, replicas=replicas)
        return
    import uvicorn

    from nnobfuscator.serving.app import create_app

    try:
        app = create_app(artifact, keys=keys_path, config=config)
    except ValueError as err:
        _fail(str(err))
    _err.print(f"serving {artifact} on http://{host}:{port} (keys: {keys_path})")
    uvicorn.run(app, host=host, port=port, log_level="info")


def _weak_strategies(artifact: Path) -> list[str]:
    """The artifact's strategies marked ``weak`` (unknown names are left to the loader)."""
    from nnobfuscator.serialization import read_config
    from nnobfuscator.strategies.base import STRATEGIES

    try:
        config = read_config(artifact)
    except ValueError as err:
        _fail(str(err))
    names = [spec.get("name") for spec in config.get("strategies", [])]
    return [n for n in names if n in STRATEGIES and STRATEGIES.get(n).weak]
