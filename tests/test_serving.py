"""The HTTP service on loopback: status codes, live key changes, no tier leaks under concurrency."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from nnobfuscator.serving import KeyStore, RateLimit, ServeConfig, create_app
from nnobfuscator.serving.images import decode_image
from nnobfuscator.serving.served_model import load_artifact
from nnobfuscator.serving.testing import (
    TinySegmenter,
    calibrated_by_hand,
    image_png,
    random_png,
    serve_in_thread,
    torchvision_artifact,
)
from nnobfuscator.tiered.model import TieredModel

TIERS = ["free", "pro", "premium"]
MAX_BODY = 256 * 1024


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return torchvision_artifact(tmp_path_factory.mktemp("served") / "artifact")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return KeyStore(tmp_path_factory.mktemp("keys") / "keys.sqlite")


@pytest.fixture(scope="module")
def server(artifact, store):
    config = ServeConfig(
        max_wait_ms=20.0,
        max_body_bytes=MAX_BODY,
        max_image_side=512,
        rate_limits={"free": RateLimit(3, 60.0), "*": None},
    )
    app = create_app(artifact, keys=store, config=config)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def direct(artifact):
    """An independent copy of the served model, for direct calls."""
    return load_artifact(artifact)


def key(store, tier="premium", **kwargs) -> dict[str, str]:
    return {"X-API-Key": store.create(tier, **kwargs)[1]}


def upload(png: bytes, name: str = "x.png", kind: str = "image/png") -> dict:
    return {"files": {"image": (name, png, kind)}}


def direct_scores(direct, png: bytes, tier: str, top: int | None = None) -> dict[int, float]:
    """The tier's class probabilities computed in-process (the ``top`` highest only)."""
    x = direct.image_spec.to_tensor(decode_image(png, max_side=4096)).unsqueeze(0)
    with torch.inference_mode():
        probs = torch.softmax(direct.model(x, tier=tier)[0], dim=0)
    order = probs.argsort(descending=True)[:top].tolist()
    return {i: float(probs[i]) for i in order}


def answer_scores(body: dict) -> dict[int, float]:
    return {entry["index"]: entry["score"] for entry in body["top_k"]}


def test_classify_multipart_json_raw_and_both_headers(server, store, direct):
    png = random_png(1)
    headers = key(store, "pro")
    bearer = {"Authorization": f"Bearer {headers['X-API-Key']}"}
    answers = [
        server.post("/v1/classify", headers=headers, params={"top_k": 10}, **upload(png)),
        server.post(
            "/v1/classify",
            headers=bearer,
            json={"image": base64.b64encode(png).decode(), "top_k": 10},
        ),
        server.post(
            "/v1/classify",
            headers={**bearer, "Content-Type": "image/png"},
            params={"top_k": 10},
            content=png,
        ),
    ]
    expected = direct_scores(direct, png, "pro")
    best5 = dict(sorted(expected.items(), key=lambda item: -item[1])[:5])
    for response in answers:
        assert response.status_code == 200, response.text
        body = response.json()
        assert response.headers["X-Tier"] == body["tier"] == "pro"
        assert body["answer_format"] == "top_k:5"  # 10 asked, the tier's format allows 5
        assert body["label"] == f"class{body['index']}" == body["top_k"][0]["label"]
        assert answer_scores(body) == pytest.approx(best5, abs=1e-5)
    default = server.post("/v1/classify", headers=headers, **upload(png)).json()
    assert len(default["top_k"]) == 5
    full = server.post(
        "/v1/classify", headers=key(store, "premium"), params={"top_k": 10}, **upload(png)
    ).json()
    assert full["answer_format"] == "scores" and len(full["top_k"]) == 10


def test_missing_invalid_and_revoked_keys_get_401(server, store):
    png = random_png(2)
    assert server.post("/v1/classify", **upload(png)).status_code == 401
    bad = server.post("/v1/classify", headers={"X-API-Key": "nnobf_x_y"}, **upload(png))
    assert bad.status_code == 401 and bad.json()["error"] == "invalid_key"
    assert "Bearer" in bad.headers["WWW-Authenticate"]
    headers = key(store, "free", name="to-revoke")
    assert server.post("/v1/classify", headers=headers, **upload(png)).status_code == 200
    store.revoke("to-revoke")
    revoked = server.post("/v1/classify", headers=headers, **upload(png))
    assert revoked.status_code == 401 and revoked.json()["error"] == "revoked_key"


def test_live_tier_change_without_restart(server, store, direct):
    png = random_png(3)
    headers = key(store, "pro", name="mover")
    first = server.post("/v1/classify", headers=headers, params={"top_k": 10}, **upload(png))
    assert first.headers["X-Tier"] == "pro"
    store.set_tier("mover", "premium")
    second = server.post("/v1/classify", headers=headers, params={"top_k": 10}, **upload(png))
    assert second.headers["X-Tier"] == second.json()["tier"] == "premium"
    assert answer_scores(second.json()) == pytest.approx(
        direct_scores(direct, png, "premium"), abs=1e-5
    )
    assert answer_scores(first.json()) != pytest.approx(answer_scores(second.json()), abs=1e-3)


def test_rate_limit_429_with_retry_after(server, store):
    headers, png = key(store, "free"), random_png(4)
    codes = [server.post("/v1/classify", headers=headers, **upload(png)) for _ in range(4)]
    assert [r.status_code for r in codes] == [200, 200, 200, 429]
    assert int(codes[-1].headers["Retry-After"]) >= 1
    assert codes[-1].json()["error"] == "rate_limited"
    # Another key of the same tier has its own bucket; unlimited tiers are not limited.
    assert server.post("/v1/classify", headers=key(store, "free"), **upload(png)).status_code == 200


def gif_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="GIF")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("request_kwargs", "status", "error"),
    [
        (
            {"files": {"image": ("x.png", b"\x89PNG\r\n\x1a\nbroken", "image/png")}},
            400,
            "invalid_image",
        ),
        ({"files": {"image": ("x.png", b"", "image/png")}}, 400, "empty_image"),
        ({"json": {"image": "not base64!"}}, 400, "invalid_base64"),
        (
            {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
            400,
            "invalid_json",
        ),
        ({"json": {"picture": "abc"}}, 422, "invalid_request"),
        (
            {"content": b"hello", "headers": {"Content-Type": "text/plain"}},
            415,
            "unsupported_media_type",
        ),
        ({"files": {"image": ("x.txt", b"hello", "text/plain")}}, 415, "unsupported_media_type"),
        ({"files": {"image": ("x.gif", gif_bytes(), "image/gif")}}, 415, "unsupported_media_type"),
        (
            {"files": {"image": ("x.gif", gif_bytes(), "image/png")}},
            415,
            "unsupported_image_format",
        ),
        ({"files": {"other": ("x.png", random_png(0), "image/png")}}, 422, "missing_image"),
        (
            {"files": {"image": ("x.png", image_png(np.zeros((600, 20), np.uint8)), "image/png")}},
            422,
            "image_size",
        ),
        (
            {"content": b"\0" * (MAX_BODY + 1), "headers": {"Content-Type": "image/png"}},
            413,
            "body_too_large",
        ),
        (
            {"params": {"top_k": 0}, "files": {"image": ("x.png", random_png(0), "image/png")}},
            422,
            "invalid_request",
        ),
    ],
)
def test_bad_input_gets_clear_4xx_and_server_keeps_serving(
    server, store, request_kwargs, status, error
):
    headers = key(store)
    kwargs = dict(request_kwargs)
    kwargs["headers"] = {**headers, **kwargs.get("headers", {})}
    response = server.post("/v1/classify", **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error and len(body["detail"]) > 10
    assert server.post("/v1/classify", headers=headers, **upload(random_png(5))).status_code == 200


def test_oversized_streamed_body_without_content_length(server, store):
    def chunks():
        for _ in range(5):
            yield b"\0" * (MAX_BODY // 4)

    response = server.post(
        "/v1/classify", headers={**key(store), "Content-Type": "image/png"}, content=chunks()
    )
    assert response.status_code == 413 and response.json()["error"] == "body_too_large"


def test_endpoints_of_other_tasks_answer_clear_404(server, store):
    headers = key(store)
    segment = server.post("/v1/segment", headers=headers, **upload(random_png(6)))
    assert segment.status_code == 404 and segment.json()["error"] == "task_not_served"
    assert "classification" in segment.json()["detail"]
    generate = server.post("/v1/generate", headers=headers, json={"prompt": "a cat"})
    assert generate.status_code == 404 and "POST /v1/classify" in generate.json()["detail"]


def test_owner_compares_all_tiers_and_others_may_not(server, store, direct):
    png = random_png(7)
    owner = key(store, None, owner=True)
    compared = server.post("/v1/compare", headers=owner, params={"top_k": 10}, **upload(png))
    assert compared.status_code == 200, compared.text
    results = compared.json()["results"]
    assert [r["tier"] for r in results] == TIERS
    for result in results:
        expected = direct_scores(direct, png, result["tier"])
        assert answer_scores(result) == pytest.approx(expected, abs=1e-5)
    assert server.post("/v1/compare", headers=key(store, "pro"), **upload(png)).status_code == 403
    # Owner keys pick any tier per request; other keys only their own or a lower one.
    low = server.post("/v1/classify", headers={**owner, "X-Request-Tier": "free"}, **upload(png))
    assert low.headers["X-Tier"] == "free"
    pro = key(store, "pro")
    assert (
        server.post(
            "/v1/classify", headers={**pro, "X-Request-Tier": "free"}, **upload(png)
        ).headers["X-Tier"]
        == "free"
    )
    up = server.post("/v1/classify", headers={**pro, "X-Request-Tier": "premium"}, **upload(png))
    assert up.status_code == 403 and up.json()["error"] == "tier_not_allowed"


def test_key_for_a_tier_the_model_lacks_gets_403(server, store):
    response = server.post("/v1/classify", headers=key(store, "gold"), **upload(random_png(8)))
    assert response.status_code == 403 and "set-tier" in response.json()["detail"]


def test_tiers_health_docs_and_metrics(server, store):
    tiers = server.get("/v1/tiers").json()
    assert [t["name"] for t in tiers["tiers"]] == TIERS and tiers["task"] == "classification"
    assert tiers["tiers"][0]["rate_limit"] == "3/min" and tiers["tiers"][2]["full"]
    assert server.get("/healthz").json()["status"] == "ok"
    assert server.get("/docs").status_code == 200
    paths = server.get("/openapi.json").json()["paths"]
    assert {"/v1/classify", "/v1/segment", "/v1/generate", "/v1/tiers", "/healthz"} <= set(paths)
    assert "multipart/form-data" in paths["/v1/classify"]["post"]["requestBody"]["content"]
    assert server.get("/nowhere").json()["error"] == "not_found"
    headers = key(store, "pro", name="metrics-probe")
    server.post("/v1/classify", headers=headers, **upload(random_png(9)))
    text = server.get("/metrics").text
    assert 'nnobf_requests_total{endpoint="/v1/classify",status="200",tier="pro"}' in text
    assert 'nnobf_samples_total{tier="premium"}' in text
    assert 'status="401",tier="none"' in text
    key_id = store.verify(headers["X-API-Key"]).id
    assert key_id not in text and "metrics-probe" not in text


def test_concurrent_mixed_tier_clients_get_exactly_direct_outputs(server, store, direct):
    """16 clients at once, tiers interleaved: each answer equals a direct call at its own tier."""
    clients = [(TIERS[i % 3], random_png(100 + i), key(store, TIERS[i % 3])) for i in range(16)]
    batches_before = _metric(server, "nnobf_batch_size_count")

    def call(client):
        tier, png, headers = client
        return server.post("/v1/classify", headers=headers, params={"top_k": 10}, **upload(png))

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(call, clients))
    for (tier, png, _), response in zip(clients, responses, strict=True):
        assert response.status_code == 200, response.text
        assert response.headers["X-Tier"] == response.json()["tier"] == tier
        got = answer_scores(response.json())
        shown = 10 if tier == "premium" else 5  # lower tiers answer top_k:5 whatever is asked
        assert response.json()["answer_format"] == ("scores" if shown == 10 else "top_k:5")
        assert got == pytest.approx(direct_scores(direct, png, tier, shown), abs=1e-5)
        for other in TIERS:  # the tiers are far apart, so a leak could not pass the check above
            if other != tier:
                assert got != pytest.approx(direct_scores(direct, png, other, shown), abs=1e-3)
    batches = _metric(server, "nnobf_batch_size_count") - batches_before
    assert batches < 16, "requests were not batched together"


def _metric(server, name: str) -> float:
    for line in server.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"metric {name} missing")


# --- other tasks, generically: a torchvision-style segmenter and a fake text-to-image model -----
def test_segment_mask_png_and_rle(store):
    torch.manual_seed(0)
    tiered = TieredModel(
        TinySegmenter(),
        _tiers(),
        [{"name": "weight-noise", "targets": ["conv1"]}],
        bytes(range(32)),
        task="segmentation",
    )
    calibrated_by_hand(tiered)
    app = create_app(tiered, keys=store, config=ServeConfig(rate_limits={}))
    png = image_png(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        headers = key(store, "free")
        as_png = client.post("/v1/segment", headers=headers, **upload(png))
        as_rle = client.post(
            "/v1/segment", headers=headers, params={"format": "rle"}, **upload(png)
        )
        wrong = client.post("/v1/classify", headers=headers, **upload(png))
    assert as_png.status_code == 200, as_png.text
    body = as_png.json()
    assert as_png.headers["X-Tier"] == body["tier"] == "free"
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask"]))))
    assert mask.shape == (24, 40) and body["width"] == 40 and body["height"] == 24
    x = reference_input(app, png)  # the server has stopped: call its model directly
    with torch.inference_mode():
        expected = tiered(x, tier="free")["out"][0].argmax(0).numpy()
    np.testing.assert_array_equal(mask, expected)
    rle = as_rle.json()["rle"]
    decoded = np.repeat(rle["values"], rle["counts"]).reshape(rle["size"])
    np.testing.assert_array_equal(decoded, mask)
    assert sorted(set(np.unique(mask).tolist())) == body["classes"]
    assert wrong.status_code == 404 and "POST /v1/segment" in wrong.json()["detail"]


def reference_input(app, png: bytes) -> torch.Tensor:
    spec = app.state.served.image_spec
    return spec.to_tensor(decode_image(png, max_side=4096)).unsqueeze(0)


class FakeTextToImage(torch.nn.Module):
    """Draws a flat colour from the prompt's length through one Linear layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(1, 3)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        lengths = torch.tensor([[float(len(p))] for p in prompts])
        colour = torch.sigmoid(self.proj(lengths / 10))
        return colour[:, :, None, None].expand(-1, 3, 8, 8)


def test_generate_prompt_to_png_and_empty_prompt(store):
    tiered = TieredModel(
        FakeTextToImage(),
        _tiers(),
        [{"name": "weight-noise", "targets": ["proj"]}],
        bytes(range(32)),
        task="text-to-image",
    )
    calibrated_by_hand(tiered)
    app = create_app(tiered, keys=store, config=ServeConfig(rate_limits={}))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        free, premium = key(store, "free"), key(store, "premium")
        with ThreadPoolExecutor(4) as pool:
            futures = [
                pool.submit(client.post, "/v1/generate", headers=h, json={"prompt": "a red cat"})
                for h in (free, premium, free, premium)
            ]
            answers = [f.result() for f in futures]
        empty = client.post("/v1/generate", headers=free, json={"prompt": "   "})
        missing = client.post("/v1/generate", headers=free, json={})
        wrong_type = client.post("/v1/generate", headers=free, content=b"a cat")
        segment = client.post("/v1/segment", headers=free, **upload(random_png(0)))
    assert [a.status_code for a in answers] == [200] * 4
    images = [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(a.json()["image"])))) for a in answers
    ]
    assert [a.headers["X-Tier"] for a in answers] == ["free", "premium", "free", "premium"]
    np.testing.assert_array_equal(images[0], images[2])
    assert not np.array_equal(images[0], images[1])
    assert images[0].shape == (8, 8, 3)
    assert empty.status_code == 422 and empty.json()["error"] == "empty_prompt"
    assert missing.status_code == 422 and wrong_type.status_code == 415
    assert segment.status_code == 404


def _tiers():
    from nnobfuscator.core.tiers import parse_tiers

    return parse_tiers("free=60%,pro=85%,premium=full")
