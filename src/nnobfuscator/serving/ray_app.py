"""Scale-out with Ray Serve: the same ``create_app()`` behind ``serve.ingress``, N replicas.

Each replica builds the app itself (one copy of the weights per replica) from the artifact path;
every replica reads the same SQLite key store, so a key's tier change or revocation reaches all
of them on the next request. Rate limits and quotas are counted where
``ServeConfig.limits_store`` says: with the default ``memory://`` each replica counts on its own
(a key gets N times its limit from N replicas); with ``redis://host:port`` every replica counts in
that Redis, so a key gets its limit once.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from nnobfuscator.serving.config import ServeConfig

APP_NAME = "nnobfuscator"


def build_application(
    artifact: str | Path,
    keys: str | Path,
    config: ServeConfig | None = None,
    *,
    replicas: int = 1,
    cpus_per_replica: float = 1.0,
    policy: str | Path | None = None,
) -> Any:
    """A bound Ray Serve application serving ``artifact`` with ``replicas`` replicas.

    ``policy``: a serving policy file every replica loads (each reloads it on its own
    ``POST /v1/policy/reload``); share ``config.limits_store`` in Redis so quotas count once.

    Example:
        >>> from ray import serve
        >>> serve.run(build_application("runs/resnet18", "keys.sqlite", replicas=2))
    """
    from ray import serve

    artifact, keys = str(Path(artifact).resolve()), str(Path(keys).resolve())
    policy = None if policy is None else str(Path(policy).resolve())
    config = config or ServeConfig()
    threads = max(1, int(cpus_per_replica))

    def build_app() -> Any:  # runs inside each replica
        import torch

        from nnobfuscator.serving.app import create_app

        torch.set_num_threads(threads)
        return create_app(artifact, keys=keys, config=config, policy=policy)

    deployment = serve.deployment(
        serve.ingress(build_app)(),
        name="TieredModelServer",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica},
    )
    return deployment.bind()


def run_ray(
    artifact: Path,
    keys: Path,
    config: ServeConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int = 1,
    policy: Path | None = None,
) -> None:
    """Start (or join, with ``RAY_ADDRESS``) a Ray cluster and serve until interrupted."""
    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    cpus = float(ray.available_resources().get("CPU", 1.0))
    serve.start(http_options={"host": host, "port": port})
    application = build_application(
        artifact,
        keys,
        config,
        replicas=replicas,
        cpus_per_replica=min(1.0, cpus / replicas),
        policy=policy,
    )
    print(f"serving {artifact} with {replicas} Ray Serve replica(s) on http://{host}:{port}")
    signal.signal(signal.SIGTERM, _interrupt)  # stop as cleanly on SIGTERM as on Ctrl-C
    try:
        serve.run(application, name=APP_NAME, route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
