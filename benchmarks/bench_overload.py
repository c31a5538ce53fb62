"""Bounded overload on loopback: brownout and tier priority vs the same server without them.

Run: ``python benchmarks/bench_overload.py [--seconds 15]`` (``make bench`` runs it as the
``overload`` section). The server runs in its own process: a torchvision resnet18 (random
weights; time does not depend on them) on 96x96 RGB uploads, with four tiers whose compute is set
by hand (lower tiers skip residual blocks and shrink the input; their relative FLOPs are in the
table), served with a policy. The load generator sends requests at a fixed rate (open loop: a
slow server does not slow the arrivals), 10% premium, 30% pro, 60% free keys, each with a
client timeout; a timed-out or refused request counts as an error.

Steps, each on a fresh server: the sustainable rate *C* (closed loop, brownout off), then per
policy (brownout on / off) an unloaded run at 0.3 *C* and an overload at 2 *C*.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import httpx
import numpy as np

from nnobfuscator.serving.testing import free_port, wait_until_serving

HEADING = "## Overload: brownout and priority under twice the sustainable rate (`make bench`)"
TIERS = "lite=40%,free=60%,pro=85%,premium=full"
MIX = {"premium": 0.1, "pro": 0.3, "free": 0.6}
IMAGE = 224
MAX_BATCH = 2
#: hand-set compute per tier: blocks skipped and input scale
SETTINGS = {
    "lite": (["layer1.1", "layer2.1", "layer3.1", "layer4.1", "layer1.0"], 0.375),
    "free": (["layer1.1", "layer2.1", "layer3.1", "layer4.1"], 0.75),
    "pro": (["layer1.1", "layer3.1"], 1.0),
}
HOLD_S = 3
PREEMPT_MS = 25.0
POLICY_ON = f"""
brownout:
  signal: queue_depth
  above: {4 * MAX_BATCH}
  below: {MAX_BATCH}
  window_s: 2
  hold_s: {HOLD_S}
  serve: {{pro: lite, free: lite}}
priority: true
"""
POLICY_OFF = "priority: false\n"
TIMEOUT_S = 5.0
#: latencies of requests sent in a run's first seconds (the load's onset) are reported apart
SETTLE_S = 1.0
#: unloaded runs last this many times an overload run (p99 needs samples; premium is 10%)
UNLOADED_RUNS = 2


def build_model():
    import torch
    from torchvision.models import resnet18

    from nnobfuscator import InputSpec, obfuscate
    from nnobfuscator.tiered.cost import relative_costs

    torch.manual_seed(0)
    tiered = obfuscate(
        resnet18(num_classes=10).eval(),
        tiers=TIERS,
        compute="block-skip+input-resolution",
        key=b"o" * 32,
        model_name="resnet18",
        input_spec=InputSpec(3, IMAGE, IMAGE),
        meta={"source": {"data": {"image_size": IMAGE}}},
    )
    for tier, (skip, scale) in SETTINGS.items():
        tiered.set_strength(tier, "feature-mix", 0.05)
        tiered.set_setting(tier, "block-skip", {"skip": skip})
        tiered.set_setting(tier, "input-resolution", {"scale": scale})
    # what calibration records, and the batcher sizes batches by
    for name, cost in relative_costs(tiered, torch.zeros(1, 3, IMAGE, IMAGE)).items():
        tiered.tiers[name].relative_cost = cost
    return tiered


def relative_flops() -> dict[str, float]:
    """Each tier's FLOPs relative to the full model (what calibration would record)."""
    tiered = build_model()
    return {name: tier.relative_cost for name, tier in tiered.tiers.items()}


def serve(port: int, keys: str, policy: str) -> None:
    """Server process entry point."""
    import torch
    import uvicorn

    from nnobfuscator.serving import ServeConfig, create_app

    torch.set_num_threads(1)  # one core for the model, one for HTTP and the load generator
    config = ServeConfig(
        max_batch_size=MAX_BATCH,
        max_wait_ms=2.0,
        rate_limits={"*": None},
        preempt_ms=PREEMPT_MS,
    )
    app = create_app(build_model(), keys=keys, config=config, policy=policy)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


class Server:
    """The server in its own process, for the length of a ``with`` block."""

    def __init__(self, keys: str, policy_text: str, tmp: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.policy = Path(tmp) / f"policy-{self.port}.yaml"
        self.policy.write_text(policy_text)
        self.keys = keys

    def __enter__(self) -> Server:
        command = [sys.executable, __file__, "--serve", "--port", str(self.port)]
        command += ["--keys", self.keys, "--policy", str(self.policy)]
        self.process = subprocess.Popen(command)
        if wait_until_serving(self.url, self.process):
            return self
        self.process.kill()
        raise RuntimeError(f"the server did not start on port {self.port}")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def schedule(count: int, seed: int = 0) -> list[str]:
    """``count`` key tiers drawn with the mix's shares."""
    rng = np.random.default_rng(seed)
    names = list(MIX)
    return list(rng.choice(names, size=count, p=[MIX[n] for n in names]))


def arrivals(rate: float, seconds: float, seed: int = 0) -> list[float]:
    """Poisson arrival times (s from the start) at ``rate`` per second over ``seconds``: the
    same process for the unloaded and the overloaded runs, so both see requests that happen to
    arrive together."""
    rng = np.random.default_rng(seed + 1)
    times = np.cumsum(rng.exponential(1.0 / rate, size=int(rate * seconds * 1.5) + 10))
    return [float(t) for t in times[times < seconds]]


async def open_loop(
    url: str,
    keys: dict[str, str],
    png: bytes,
    rate: float,
    seconds: float,
    only: str | None = None,
):
    """Send requests arriving at ``rate`` per second (Poisson) for ``seconds``, or with ``only``,
    just that key tier's requests at the same moments; each result is ``(key tier, served tier
    or None, latency s, ok, sent at s from the start)``."""
    moments = arrivals(rate, seconds)
    tiers = schedule(len(moments))
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    results = []
    begin = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=TIMEOUT_S) as client:

        async def one(tier: str) -> None:
            started = time.perf_counter()
            try:
                response = await asyncio.wait_for(
                    client.post(
                        "/v1/classify",
                        headers={"X-API-Key": keys[tier]},
                        files={"image": ("x.png", png, "image/png")},
                    ),
                    TIMEOUT_S,
                )
                ok = response.status_code == 200
                served = response.headers.get("X-Tier") if ok else None
            except (httpx.HTTPError, TimeoutError):
                ok, served = False, None
            results.append((tier, served, time.perf_counter() - started, ok, started - begin))

        tasks = []
        for moment, tier in zip(moments, tiers, strict=True):
            if only is not None and tier != only:
                continue
            delay = begin + moment - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(tier)))
        await asyncio.gather(*tasks)
    return results


async def closed_loop(url: str, keys: dict[str, str], png: bytes, clients: int, seconds: float):
    """Requests answered per second with ``clients`` always in flight (the sustainable rate)."""
    tiers = schedule(100_000, seed=1)
    done = 0
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        stop = time.perf_counter() + seconds

        async def worker(index: int) -> None:
            nonlocal done
            n = index
            while time.perf_counter() < stop:
                tier = tiers[n % len(tiers)]
                n += clients
                response = await client.post(
                    "/v1/classify",
                    headers={"X-API-Key": keys[tier]},
                    files={"image": ("x.png", png, "image/png")},
                )
                response.raise_for_status()
                done += 1

        await asyncio.gather(*(worker(i) for i in range(clients)))
    return done / seconds


def smooth_png() -> bytes:
    """A gradient image (a small upload, like a photo's PNG would not be)."""
    from nnobfuscator.serving.testing import image_png

    ramp = np.linspace(0, 255, IMAGE, dtype=np.float32)
    rgb = np.stack(
        [np.add.outer(ramp, ramp) / 2, np.tile(ramp, (IMAGE, 1)), np.full((IMAGE, IMAGE), 128.0)],
        -1,
    )
    return image_png(rgb.astype(np.uint8))


def summarise(results: list[tuple], tiers: Iterable[str] = tuple(MIX)) -> dict[str, dict]:
    """Per key tier: requests and errors over the whole run; latencies and served tiers of the
    requests sent after the first ``SETTLE_S`` (the load's onset, while brownout engages, is
    reported apart as its worst latency)."""
    rows = {}
    for tier in tiers:
        mine = [r for r in results if r[0] == tier]
        settled = [r for r in mine if r[4] >= SETTLE_S and r[3]]
        onset = [r[2] for r in mine if r[4] < SETTLE_S and r[3]]
        latencies = sorted(r[2] for r in settled)
        rows[tier] = {
            "requests": len(mine),
            "errors": sum(1 for r in mine if not r[3]),
            "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
            if latencies
            else None,
            "onset_max_ms": 1000 * max(onset) if onset else None,
            "served": dict(Counter(r[1] for r in mine if r[3])),
        }
    return rows


def run(seconds: float, quick: bool = False) -> dict:
    from nnobfuscator.serving.api_keys import KeyStore

    png = smooth_png()
    out: dict = {"flops": relative_flops(), "seconds": seconds}
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "keys.sqlite")
        store = KeyStore(store_path)
        keys = {tier: store.create(tier)[1] for tier in MIX}
        with Server(store_path, POLICY_OFF, tmp) as server:
            asyncio.run(closed_loop(server.url, keys, png, 32, 2))  # warm-up
            capacity = asyncio.run(closed_loop(server.url, keys, png, 32, 3 if quick else 6))
            # the floor for any policy: the overload's premium requests alone, at their moments
            alone = asyncio.run(
                open_loop(server.url, keys, png, 2 * capacity, seconds, only="premium")
            )
        out["capacity_rps"] = capacity
        out["premium alone"] = summarise(alone, ["premium"])
        calm_runs = []
        for name, policy in (("brownout on", POLICY_ON), ("brownout off", POLICY_OFF)):
            with Server(store_path, policy, tmp) as server:
                asyncio.run(closed_loop(server.url, keys, png, 8, 1))  # warm-up
                calm = asyncio.run(
                    open_loop(server.url, keys, png, 0.3 * capacity, UNLOADED_RUNS * seconds)
                )
                time.sleep(1)
                loaded = asyncio.run(open_loop(server.url, keys, png, 2 * capacity, seconds))
            calm_runs += calm
            out[name] = {"unloaded": summarise(calm), "overload": summarise(loaded)}
            print(name, out[name])
        # brownout never engages at 0.3 C: both policies' unloaded premium requests, pooled
        out["unloaded premium"] = summarise(calm_runs)["premium"]
    return out


def _fmt(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def write_section(result: dict) -> tuple[str, list[tuple[str, str]]]:
    from _common import where

    flops = ", ".join(f"{t} {v:.2f}" for t, v in result["flops"].items())
    lines = [
        HEADING,
        "",
        f"{where()}; server and load generator on the same machine (the model on one torch "
        f"thread). resnet18 at {IMAGE}x{IMAGE} RGB, tiers `{TIERS}` with hand-set compute "
        f"(relative FLOPs: {flops}); micro-batches of up to {MAX_BATCH}. Sustainable rate "
        f"*C* = **{result['capacity_rps']:.0f} requests/s** (closed loop, 32 clients, brownout "
        f"off). Each overload run: {result['seconds']:g} s of open-loop Poisson arrivals "
        f"({UNLOADED_RUNS * result['seconds']:g} s unloaded), keys 10% premium, 30% "
        f"pro, 60% free, client timeout {TIMEOUT_S:g} s (a timeout or refusal is an error). "
        "*Brownout on*: `queue_depth` above "
        f"{4 * MAX_BATCH} serves pro and free as lite until it has stayed at {MAX_BATCH} or "
        f"under for {HOLD_S} s, higher tiers are batched first, and a batch of a cheaper tier "
        f"runs in chunks of about {PREEMPT_MS:g} ms that a higher tier may cut between (`preempt_ms`); "
        "*off*: first come, first served, no brownout. Errors count every request; p50, p99 "
        f"and *served at* the requests sent after the first {SETTLE_S:g} s (the overload's "
        "onset, while brownout engages: its worst latency is in *onset max*).",
        "",
        "| policy | load | key tier | requests | errors | p50 (ms) | p99 (ms) | onset max (ms) "
        "| served at |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("brownout on", "brownout off"):
        for phase, label in (("unloaded", "0.3 C"), ("overload", "2 C")):
            for tier, row in result[name][phase].items():
                served = ", ".join(f"{t} {n}" for t, n in sorted(row["served"].items()))
                lines.append(
                    f"| {name} | {label} | {tier} | {row['requests']} | {row['errors']} | "
                    f"{_fmt(row['p50_ms'])} | {_fmt(row['p99_ms'])} | "
                    f"{_fmt(row['onset_max_ms'])} | {served} |"
                )
    on, off = result["brownout on"], result["brownout off"]

    calm = result["unloaded premium"]

    def ratio(policy: dict) -> float | None:
        loaded = policy["overload"]["premium"]["p99_ms"]
        return None if not calm["p99_ms"] or not loaded else loaded / calm["p99_ms"]

    def free_share(policy: dict) -> str:
        row = policy["overload"]["free"]
        return f"{row['requests'] - row['errors']}/{row['requests']} answered"

    alone = result["premium alone"]
    floor = alone["premium"]["p99_ms"]
    on_p99 = on["overload"]["premium"]["p99_ms"]
    lines += [
        "",
        "*Premium alone*: the overload's premium requests at the same moments, no other "
        f"traffic: p50 {_fmt(alone['premium']['p50_ms'])} ms, p99 {_fmt(floor)} ms. That is "
        "the floor for any policy on one model thread: a premium request that arrives during "
        "another premium forward waits for it. Brownout on, "
        f"premium p99 / premium alone: **{_fmt(on_p99 / floor if on_p99 and floor else None, 2)}"
        f"×**; premium alone / unloaded: {_fmt(floor / calm['p99_ms'] if floor else None, 2)}×.",
        "",
        f"Unloaded premium (both policies' 0.3 C runs, {calm['requests']} requests): p50 "
        f"{_fmt(calm['p50_ms'])} ms, p99 {_fmt(calm['p99_ms'])} ms. "
        f"Premium p99 under overload / unloaded: brownout on **{_fmt(ratio(on), 2)}×** "
        f"({on['overload']['premium']['errors']} errors), off {_fmt(ratio(off), 2)}× "
        f"({off['overload']['premium']['errors']} errors). Free keys under overload: on "
        f"{free_share(on)} (served at {', '.join(sorted(on['overload']['free']['served']))}), "
        f"off {free_share(off)}.",
    ]
    summary = [
        (
            "Overload at 2× the sustainable rate, premium p99 vs unloaded (brownout on / off)",
            f"{_fmt(ratio(on), 2)}× / {_fmt(ratio(off), 2)}×; premium errors "
            f"{on['overload']['premium']['errors']} / {off['overload']['premium']['errors']}",
        ),
        (
            "Overload at 2× the sustainable rate, free keys answered (brownout on / off)",
            f"{free_share(on)} / {free_share(off)}",
        ),
    ]
    return "\n".join(lines) + "\n", summary


def run_section(quick: bool = False):
    """The ``make bench`` section."""
    from _common import Section

    result = run(4.0 if quick else 15.0, quick)
    text, summary = write_section(result)
    return Section("overload", text, summary, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--keys", help=argparse.SUPPRESS)
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.port, args.keys, args.policy)
        return
    text, _ = write_section(run(args.seconds))
    print(text)


if __name__ == "__main__":
    main()
