"""A throwaway ``redis-server`` on a free loopback port, for the tests of shared limits."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SKIP_REASON = (
    "redis-server is not installed (make test installs it with apt); skipping the Redis tests"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def redis_server(folder: Path, *, timeout: float = 15.0) -> Iterator[str]:
    """Start ``redis-server`` (no persistence, loopback only); yields ``redis://127.0.0.1:N/0``.

    Raises:
        FileNotFoundError: ``redis-server`` is not on PATH (callers skip with :data:`SKIP_REASON`).
        RuntimeError: it did not answer PING within ``timeout`` seconds (its log is in the message).
    """
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError(SKIP_REASON)
    folder.mkdir(parents=True, exist_ok=True)
    port, log = _free_port(), folder / "redis.log"
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    command += ["--appendonly", "no", "--dir", str(folder), "--logfile", str(log)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                text = log.read_text() if log.exists() else ""
                raise RuntimeError(f"redis-server on port {port} did not start:\n{text[-2000:]}")
            time.sleep(0.05)
        yield url
    finally:
        client.close()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def flush(url: str) -> None:
    """Empty the database of ``url`` (between tests)."""
    import redis

    with redis.Redis.from_url(url) as client:
        client.flushdb()
