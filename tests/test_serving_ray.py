"""`nnobf serve --ray`: the same app on Ray Serve replicas with a shared key store (loopback)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from nnobfuscator.serving import KeyStore, ServeConfig
from nnobfuscator.serving.config import RateLimit
from nnobfuscator.serving.images import decode_image
from nnobfuscator.serving.served_model import load_artifact
from nnobfuscator.serving.testing import free_port, random_png, torchvision_artifact

pytestmark = [
    pytest.mark.ray,
    pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20"),
]
TIERS = ["free", "pro", "premium"]


@pytest.fixture(scope="module")
def ray_instance(tmp_path_factory):
    """A local Ray instance with Serve's proxy on a free loopback port; yields
    ``(artifact, keys, port)`` for the applications the tests deploy on it."""
    ray = pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[ray]'")
    from ray import serve

    tmp = tmp_path_factory.mktemp("ray")
    artifact = torchvision_artifact(tmp / "artifact")
    keys = tmp / "keys.sqlite"
    KeyStore(keys)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            ignore_reinit_error=True,
        )
    except Exception as err:  # no shared memory, sandbox limits, ...
        pytest.skip(f"a local Ray instance cannot start here: {type(err).__name__}: {err}")
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield artifact, keys, port
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_server(ray_instance):
    from ray import serve

    from nnobfuscator.serving.ray_app import APP_NAME, build_application

    artifact, keys, port = ray_instance
    config = ServeConfig(max_wait_ms=10.0, rate_limits={})
    serve.run(
        build_application(artifact, keys, config, replicas=2, cpus_per_replica=0.5),
        name=APP_NAME,
        route_prefix="/",
    )
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield client, KeyStore(keys), load_artifact(artifact)


def _scores(body: dict) -> dict[int, float]:
    return {entry["index"]: entry["score"] for entry in body["top_k"]}


def _direct(direct, png: bytes, tier: str) -> dict[int, float]:
    x = direct.image_spec.to_tensor(decode_image(png, max_side=4096)).unsqueeze(0)
    with torch.inference_mode():
        probs = torch.softmax(direct.model(x, tier=tier)[0], dim=0)
    shown = probs.argsort(descending=True)[: 10 if tier == "premium" else 5]  # tier formats
    return {i: float(probs[i]) for i in shown.tolist()}


def test_ray_replicas_serve_tiers_and_share_the_key_store(ray_server):
    client, store, direct = ray_server
    assert client.get("/healthz").json()["tiers"] == TIERS
    clients = [
        (TIERS[i % 3], random_png(200 + i), store.create(TIERS[i % 3])[1]) for i in range(12)
    ]

    def call(item):
        tier, png, key = item
        files = {"image": ("x.png", png, "image/png")}
        return client.post(
            "/v1/classify", headers={"X-API-Key": key}, params={"top_k": 10}, files=files
        )

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(call, clients))
    for (tier, png, _), response in zip(clients, responses, strict=True):
        assert response.status_code == 200, response.text
        assert response.headers["X-Tier"] == tier
        assert _scores(response.json()) == pytest.approx(_direct(direct, png, tier), abs=1e-5)

    _, key = store.create("free", name="ray-user")
    headers = {"Authorization": f"Bearer {key}"}
    files = {"image": ("x.png", random_png(1), "image/png")}
    assert client.post("/v1/classify", headers=headers, files=files).headers["X-Tier"] == "free"
    store.set_tier("ray-user", "premium")  # every replica sees it on the next request
    tiers = {
        client.post("/v1/classify", headers=headers, files=files).headers["X-Tier"]
        for _ in range(6)
    }
    assert tiers == {"premium"}
    store.revoke(key)
    codes = {
        client.post("/v1/classify", headers=headers, files=files).status_code for _ in range(6)
    }
    assert codes == {401}
    assert client.post("/v1/classify", files=files).status_code == 401


def test_ray_replicas_share_rate_limits_through_redis(ray_instance, redis_server_url):
    """Two replicas counting in one Redis: a key limited to L per minute gets L answers, not 2L."""
    from ray import serve

    from nnobfuscator.serving.ray_app import build_application

    artifact, keys, port = ray_instance
    limit = 6
    config = ServeConfig(
        max_wait_ms=10.0,
        rate_limits={"*": RateLimit(limit, 60.0)},
        limits_store=redis_server_url,
    )
    serve.run(
        build_application(artifact, keys, config, replicas=2, cpus_per_replica=0.5),
        name="limited",
        route_prefix="/limited",
    )
    try:
        _, key = KeyStore(keys).create("free", name="limited-user")
        files = {"image": ("x.png", random_png(7), "image/png")}
        url = f"http://127.0.0.1:{port}/limited/v1/classify"
        client = httpx.Client(timeout=60, headers={"X-API-Key": key})
        with client, ThreadPoolExecutor(4) as pool:  # concurrent: both replicas take requests
            codes = list(pool.map(lambda _: client.post(url, files=files), range(3 * limit)))
        statuses = [response.status_code for response in codes]
        assert set(statuses) <= {200, 429}, [
            r.text for r in codes if r.status_code not in (200, 429)
        ]
        answered = statuses.count(200)
        print(f"limit {limit}/min over 2 replicas: {answered} of {len(statuses)} answered")
        assert limit - 1 <= answered <= limit + 1, statuses
        refused = next(r for r in codes if r.status_code == 429)
        assert int(refused.headers["Retry-After"]) >= 1
    finally:
        serve.delete("limited")
