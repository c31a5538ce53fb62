"""HTTP serving: our server at the full tier vs a plain FastAPI server of the bare model.

Run: ``python benchmarks/bench_serving.py [--seconds 4 --rounds 8 --clients 16]`` (``make bench``
runs a shorter :func:`run_section`). Updates its own section of ``benchmarks/RESULTS.md`` (other
sections are kept).

Both servers run in their own process on loopback with the same model (the zoo's resnet18
architecture, untrained: time does not depend on the weights), the same image decoding and the
same micro-batcher; ours adds key lookup (SQLite), rate limiting, metrics and the tier machinery.
A load generator keeps ``--clients`` concurrent requests in flight (multipart PNG uploads) for
``--seconds``; rounds alternate plain / tiered so drifts in machine load hit both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date

import httpx
import numpy as np
from _results import update_section
from fastapi import FastAPI, File, UploadFile

from nnobfuscator.serving.testing import wait_until_serving

HEADING = "## HTTP serving: full tier vs a plain FastAPI server (`benchmarks/bench_serving.py`)"
STRENGTHS = {"free": 1.0, "pro": 0.5}


def build_model():
    """The tiered resnet18 (1x16x16 digits input) with fixed tier strengths."""
    import torch

    from nnobfuscator import InputSpec, obfuscate
    from nnobfuscator.zoo import build_classifier

    torch.manual_seed(0)
    tiered = obfuscate(
        build_classifier("resnet18").eval(),
        tiers="free=60%,pro=85%,premium=full",
        key=b"b" * 32,
        model_name="resnet18",
        input_spec=InputSpec(1, 16, 16),
        meta={"source": {"data": {"image_size": 16, "zoo": "digits"}}},
    )
    for tier, strength in STRENGTHS.items():
        tiered.set_strength(tier, "feature-mix", strength)
    return tiered


def plain_app(max_batch_size: int, max_wait_ms: float):
    """A plain FastAPI endpoint: decode, batch, run the bare model, answer the top-5."""
    import torch
    from starlette.concurrency import run_in_threadpool

    from nnobfuscator.serving.batcher import MicroBatcher
    from nnobfuscator.serving.images import decode_image
    from nnobfuscator.serving.served_model import serve_model

    served = serve_model(build_model())
    bare = served.model.unload()
    batcher = MicroBatcher(
        lambda batch, tiers: bare(batch), max_batch_size=max_batch_size, max_wait_ms=max_wait_ms
    )
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/v1/classify")
    async def classify(image: UploadFile = File(...)) -> dict:
        data = await image.read()

        def prepare():
            return served.image_spec.to_tensor(decode_image(data, max_side=4096))

        logits = await batcher.submit(await run_in_threadpool(prepare), "plain")
        scores, indices = torch.softmax(logits, 0).topk(5)
        return {
            "label": served.label(int(indices[0])),
            "top_k": [
                {"label": served.label(int(i)), "index": int(i), "score": float(s)}
                for s, i in zip(scores, indices, strict=True)
            ],
        }

    return app


def serve(kind: str, port: int, keys: str, max_batch_size: int, max_wait_ms: float) -> None:
    """Server process entry point."""
    import uvicorn

    from nnobfuscator.serving import ServeConfig, create_app

    if kind == "plain":
        app = plain_app(max_batch_size, max_wait_ms)
    else:
        config = ServeConfig(
            max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, rate_limits={"*": None}
        )
        app = create_app(build_model(), keys=keys, config=config)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def start_server(kind: str, port: int, keys: str, args: argparse.Namespace) -> subprocess.Popen:
    command = [sys.executable, __file__, "--serve", kind, "--port", str(port), "--keys", keys]
    command += [
        "--max-batch-size",
        str(args.max_batch_size),
        "--max-wait-ms",
        str(args.max_wait_ms),
    ]
    process = subprocess.Popen(command)
    if wait_until_serving(f"http://127.0.0.1:{port}", process):
        return process
    process.kill()
    raise RuntimeError(f"{kind} server did not start on port {port}")


async def load(url: str, headers: dict[str, str], pngs: list[bytes], clients: int, seconds: float):
    """Keep ``clients`` requests in flight for ``seconds``; returns each request's latency."""
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=30) as c:
        stop = time.perf_counter() + seconds

        async def worker(index: int) -> None:
            n = index
            while time.perf_counter() < stop:
                png = pngs[n % len(pngs)]
                n += clients
                started = time.perf_counter()
                response = await c.post(
                    "/v1/classify", files={"image": ("x.png", png, "image/png")}
                )
                if response.status_code != 200:
                    raise RuntimeError(f"{url}: {response.status_code} {response.text}")
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker(i) for i in range(clients)))
    return latencies


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    from nnobfuscator.serving.api_keys import KeyStore
    from nnobfuscator.serving.testing import free_port, image_png

    rng = np.random.default_rng(0)
    pngs = [image_png(rng.integers(0, 256, (16, 16), dtype=np.uint8)) for _ in range(64)]
    with tempfile.TemporaryDirectory() as tmp:
        keys = os.path.join(tmp, "keys.sqlite")
        _, premium = KeyStore(keys).create("premium", name="bench")
        ports = {"plain": free_port(), "tiered": free_port()}
        servers = {kind: start_server(kind, port, keys, args) for kind, port in ports.items()}
        headers = {"plain": {}, "tiered": {"X-API-Key": premium}}
        samples: dict[str, list[float]] = {"plain": [], "tiered": []}
        elapsed: dict[str, float] = {"plain": 0.0, "tiered": 0.0}
        try:
            for kind, port in ports.items():  # warm-up round, not counted
                asyncio.run(load(f"http://127.0.0.1:{port}", headers[kind], pngs, args.clients, 2))
            for _ in range(args.rounds):
                for kind, port in ports.items():
                    url = f"http://127.0.0.1:{port}"
                    latencies = asyncio.run(
                        load(url, headers[kind], pngs, args.clients, args.seconds)
                    )
                    samples[kind] += latencies
                    elapsed[kind] += args.seconds
        finally:
            for process in servers.values():
                process.terminate()
                process.wait(timeout=30)
    results = {}
    for kind, latencies in samples.items():
        ordered = sorted(latencies)
        results[kind] = {
            "rps": len(latencies) / elapsed[kind],
            "p50": 1000 * statistics.median(ordered),
            "p99": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "n": len(latencies),
        }
    return results


def write_section(
    results: dict[str, dict[str, float]], args: argparse.Namespace, load_average: float
) -> str:
    import torch

    plain, tiered = results["plain"], results["tiered"]
    lines = [
        HEADING,
        "",
        f"Measured {date.today().isoformat()} on {platform.machine()} CPU, "
        f"{os.cpu_count()} cores, torch {torch.__version__}; resnet18 (digits zoo architecture, "
        f"1x16x16 PNG uploads), {args.clients} concurrent clients, {args.rounds} alternating "
        f"rounds of {args.seconds:g} s per server, micro-batches of up to {args.max_batch_size} "
        f"({args.max_wait_ms:g} ms window). Client and servers share the machine. *Ours* is "
        "`create_app` at the full tier (key lookup, rate limiting, metrics, tier machinery); "
        "*plain* is a bare FastAPI endpoint over the unwrapped model with the same decoding and "
        f"batcher. Load average when the run started: {load_average:.2f} (other work on the "
        "machine slows both servers alike, since rounds alternate).",
        "",
        "| server | requests/s | p50 (ms) | p99 (ms) | requests |",
        "|---|---|---|---|---|",
        f"| plain FastAPI, bare model | {plain['rps']:.1f} | {plain['p50']:.1f} | "
        f"{plain['p99']:.1f} | {plain['n']} |",
        f"| ours, full tier | {tiered['rps']:.1f} | {tiered['p50']:.1f} | {tiered['p99']:.1f} | "
        f"{tiered['n']} |",
        f"| **ratio ours / plain** | **{tiered['rps'] / plain['rps']:.3f}** | "
        f"{tiered['p50'] / plain['p50']:.3f} | {tiered['p99'] / plain['p99']:.3f} | |",
    ]
    return "\n".join(lines) + "\n"


def run_section(quick: bool = False):
    """The ``make bench`` section: a shortened run (3 rounds of 3 s; quick: 1 round of 1 s)."""
    from _common import Section

    args = argparse.Namespace(
        seconds=1.0 if quick else 3.0,
        rounds=1 if quick else 3,
        clients=16,
        max_batch_size=32,
        max_wait_ms=2.0,
    )
    load_average = os.getloadavg()[0]
    results = run(args)
    ratio = results["tiered"]["rps"] / results["plain"]["rps"]
    summary = [
        (
            "HTTP serving, full tier vs a plain FastAPI endpoint (requests/s)",
            f"{ratio:.2f}× ({results['tiered']['rps']:.0f} vs {results['plain']['rps']:.0f})",
        )
    ]
    return Section("serving", write_section(results, args, load_average), summary, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--serve", choices=["plain", "tiered"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--keys", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="Print only.")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.keys, args.max_batch_size, args.max_wait_ms)
        return
    load_average = os.getloadavg()[0]
    results = run(args)
    section = write_section(results, args, load_average)
    print(section)
    if not args.no_write:
        update_section(section)


if __name__ == "__main__":
    main()
