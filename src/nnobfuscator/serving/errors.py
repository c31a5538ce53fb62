"""One JSON error shape for every failure: ``{"error": CODE, "detail": MESSAGE}``; on the
OpenAI-compatible routes (:data:`OPENAI_PATHS`) OpenAI's shape with the same message,
``{"error": {"message", "type", "param", "code"}, "detail": MESSAGE}``, so OpenAI clients
show it."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("nnobfuscator.serving")
#: routes whose errors take OpenAI's shape
OPENAI_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
_OPENAI_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}


class ApiError(Exception):
    """A request the server refuses, with a status, a stable code and a message that teaches.

    Args:
        status: the HTTP status (4xx for the client's mistakes).
        code: a short machine-readable reason, e.g. ``"invalid_image"``.
        detail: what was wrong and what to do instead.
        headers: extra response headers (``Retry-After``, ``WWW-Authenticate``).
        param: the request field at fault (OpenAI's ``param``), if one is.
    """

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}
        self.param = param


def error_response(
    status: int,
    code: str,
    detail: str,
    headers: dict[str, str] | None = None,
    *,
    openai: bool = False,
    param: str | None = None,
    **extra: object,
) -> JSONResponse:
    """The error answer; with ``openai``, in OpenAI's shape (see the module docstring)."""
    if openai:
        return JSONResponse(openai_error(status, code, detail, param), status, headers=headers)
    return JSONResponse({"error": code, "detail": detail, **extra}, status, headers=headers)


def openai_error(status: int, code: str, detail: str, param: str | None = None) -> dict:
    """An error body in OpenAI's shape (also sent as the last event of a failed stream)."""
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    if status == 429 and "quota" in code:
        kind = "insufficient_quota"
    error = {"message": detail, "type": kind, "param": param, "code": code}
    return {"error": error, "detail": detail}


def _openai(request: Request) -> bool:
    return request.url.path in OPENAI_PATHS


_STATUS_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


def install_error_handlers(app: FastAPI) -> None:
    """Turn ApiError, validation errors, HTTP errors and crashes into the JSON error shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(
            exc.status, exc.code, exc.detail, exc.headers, openai=_openai(request), param=exc.param
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}"
            for err in exc.errors()
        )
        if _openai(request):
            return error_response(
                400, "invalid_request", f"the request is not valid: {problems}", openai=True
            )
        return error_response(
            422, "invalid_request", f"the request is not valid: {problems}", errors=_plain(exc)
        )

    from nnobfuscator.serving.limiter import LimitStoreError

    @app.exception_handler(LimitStoreError)
    async def _limits_down(request: Request, exc: LimitStoreError) -> JSONResponse:
        # the message names the store without its password
        return error_response(
            503,
            "limits_unavailable",
            f"{exc}; retry shortly",
            {"Retry-After": "5"},
            openai=_openai(request),
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        detail = exc.detail
        if exc.status_code == 404:
            detail = f"no endpoint at {request.url.path}; see /docs for the API"
        return error_response(
            exc.status_code,
            code,
            str(detail),
            getattr(exc, "headers", None),
            openai=_openai(request),
        )

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(
            500,
            "internal_error",
            f"the server failed on this request ({type(exc).__name__})",
            openai=_openai(request),
        )


def _plain(exc: RequestValidationError) -> list[dict[str, object]]:
    return [
        {"loc": list(err.get("loc", ())), "msg": str(err.get("msg")), "type": err.get("type")}
        for err in exc.errors()
    ]
