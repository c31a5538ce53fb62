"""A plain ASGI middleware: caps request bodies (413) and records per-tier request metrics."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nnobfuscator.serving.errors import OPENAI_PATHS, error_response
from nnobfuscator.serving.metrics import Metrics


class BodyTooLarge(Exception):
    """Raised from ``receive`` when a streamed body passes the limit."""


def body_too_large(limit: int) -> tuple[int, str, str]:
    return (
        413,
        "body_too_large",
        f"the request body is larger than {limit} bytes; send a smaller image "
        "(the server's limit is set with --max-body-mb)",
    )


class ServingMiddleware:
    """Refuses bodies over ``max_body_bytes`` and counts every request by endpoint and tier.

    The tier label comes from ``scope["state"]["tier"]``, set by authentication; requests that
    never authenticated are counted under ``tier="none"``.
    """

    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        scope.setdefault("state", {})
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        length = _content_length(scope)
        if length is not None and length > self.max_body_bytes:
            refusal = error_response(
                *body_too_large(self.max_body_bytes), openai=scope.get("path") in OPENAI_PATHS
            )
            await refusal(scope, receive, send_wrapper)
        else:
            await self.app(scope, self._limited(receive), send_wrapper)
        endpoint = _endpoint(scope)
        tier = scope["state"].get("tier", "none")
        self.metrics.requests.labels(endpoint, tier, str(status["code"])).inc()
        self.metrics.latency.labels(endpoint, tier).observe(time.perf_counter() - started)

    def _limited(self, receive: Receive) -> Receive:
        received = 0

        async def wrapper() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge()
            return message

        return wrapper


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _endpoint(scope: Scope) -> str:
    """The route template (``/v1/classify``), so unknown paths do not blow up label counts."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"
