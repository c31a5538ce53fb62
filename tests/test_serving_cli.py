"""`nnobf serve` as a user runs it: a real process on loopback, keys changed with `nnobf keys`."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest
from typer.testing import CliRunner

from nnobfuscator.cli import app
from nnobfuscator.serving.testing import (
    free_port,
    random_png,
    torchvision_artifact,
    wait_until,
    wait_until_serving,
)


def _keys(*args: str) -> str:
    result = CliRunner().invoke(app, ["keys", *args])
    assert result.exit_code == 0, result.output
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture
def served(tmp_path):
    artifact = torchvision_artifact(tmp_path / "artifact")
    keys, port = tmp_path / "keys.sqlite", free_port()
    command = [sys.executable, "-c", "from nnobfuscator.cli import app; app()", "serve"]
    command += [str(artifact), "--port", str(port), "--keys", str(keys)]
    command += ["--rate-limit", "free=2/min,*=none"]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    if not wait_until_serving(url, process, timeout_s=60):
        process.kill()
        pytest.fail(f"nnobf serve did not start:\n{process.communicate()[0]}")
    try:
        yield url, keys
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_serve_command_with_live_key_changes(served):
    url, keys = served
    key = _keys("create", "--tier", "pro", "--name", "cli-user", "--keys", str(keys))
    files = {"image": ("x.png", random_png(0), "image/png")}
    with httpx.Client(base_url=url, timeout=30) as client:
        first = client.post("/v1/classify", headers={"X-API-Key": key}, files=files)
        assert first.status_code == 200 and first.headers["X-Tier"] == "pro"
        assert {"tier", "label", "top_k"} <= set(first.json())
        _keys("set-tier", key, "free", "--keys", str(keys))
        codes = [
            client.post("/v1/classify", headers={"Authorization": f"Bearer {key}"}, files=files)
            for _ in range(3)
        ]
        assert [r.headers.get("X-Tier") for r in codes[:2]] == ["free", "free"]
        assert codes[2].status_code == 429 and "Retry-After" in codes[2].headers
        _keys("revoke", "cli-user", "--keys", str(keys))
        assert (
            client.post("/v1/classify", headers={"X-API-Key": key}, files=files).status_code == 401
        )
        assert client.get("/healthz").status_code == 200


def test_serve_refuses_a_bad_policy_with_its_line(tmp_path):
    artifact = torchvision_artifact(tmp_path / "artifact")
    policy = tmp_path / "policy.yaml"
    policy.write_text("tiers:\n  pro:\n    quota: 10/day\n    on_exhausted: {downgrade: gold}\n")
    result = CliRunner().invoke(app, ["serve", str(artifact), "--policy", str(policy)])
    assert result.exit_code == 2
    assert "line 4" in result.output and "unknown tier 'gold'" in result.output


def test_serve_reloads_its_policy_on_sighup(tmp_path):
    import signal

    artifact = torchvision_artifact(tmp_path / "artifact")
    policy = tmp_path / "policy.yaml"
    policy.write_text("tiers:\n  free: {quota: 10/day}\n")
    port = free_port()
    command = [sys.executable, "-c", "from nnobfuscator.cli import app; app()", "serve"]
    command += [str(artifact), "--port", str(port), "--keys", str(tmp_path / "k.sqlite")]
    command += ["--policy", str(policy)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def free_quota() -> str | None:
        tiers = httpx.get(f"{url}/v1/tiers", timeout=5).json()["tiers"]
        return next(t["quota"] for t in tiers if t["name"] == "free")

    def wait_for(check) -> bool:
        return wait_until(check, process, timeout_s=60)

    try:
        assert wait_for(lambda: free_quota() == "10/day"), "nnobf serve did not start"
        policy.write_text("tiers:\n  free: {quota: 20/day}\n")
        process.send_signal(signal.SIGHUP)
        assert wait_for(lambda: free_quota() == "20/day")
        policy.write_text("tiers:\n  free: {quota: twenty}\n")
        process.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert free_quota() == "20/day" and process.poll() is None
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert "policy not reloaded" in output and "line 2" in output


@pytest.mark.parametrize(
    "command",
    [
        ["serve"],
        *[
            ["keys", name]
            for name in (
                "create",
                "rotate",
                "list",
                "set-tier",
                "set-expiry",
                "revoke",
                "audit",
                "usage",
            )
        ],
    ],
)
def test_every_serving_command_renders_its_help(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
