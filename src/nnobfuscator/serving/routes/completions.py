"""OpenAI-compatible text generation: ``POST /v1/completions`` and ``POST /v1/chat/completions``
for a served model whose task is ``text-generation``.

The API key picks the tier as on every inference route; the request's prompt plus its
``max_tokens`` are charged to the key's token quota first (what it does not use is given back).
Concurrent requests of every tier share ``generate`` calls through the generation batcher
(:mod:`nnobfuscator.serving.generation_batcher`); with ``"stream": true`` each request's text
comes back as server-sent events as its row decodes. Every answer, errors after the key was
checked included, carries the ``X-Tier`` header.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from nnobfuscator.serving.auth import Principal
from nnobfuscator.serving.completion_text import Detokenizer, encode_chat, encode_prompt, sse
from nnobfuscator.serving.errors import ApiError, openai_error
from nnobfuscator.serving.generation_batcher import GenerationJob, RowStream
from nnobfuscator.serving.middleware import BodyTooLarge, body_too_large
from nnobfuscator.serving.openai_schemas import (
    REFUSED_FIELDS,
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from nnobfuscator.serving.policy_engine import TokenReservation
from nnobfuscator.serving.results import derived_seed
from nnobfuscator.serving.state import (
    ERRORS,
    TEXT_GENERATION,
    TIER_HEADER,
    Serving,
    caller,
    serves,
    serving,
)

RequestT = TypeVar("RequestT", bound=BaseModel)
logger = logging.getLogger("nnobfuscator.serving")
router = APIRouter(
    tags=["text generation"],
    responses=ERRORS,
    dependencies=[Depends(serves(TEXT_GENERATION))],
)


def _body_doc(schema: type[BaseModel]) -> dict[str, Any]:
    content = {"application/json": {"schema": schema.model_json_schema()}}
    return {"requestBody": {"required": True, "content": content}}


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    openapi_extra=_body_doc(CompletionRequest),
)
async def completions(
    request: Request, principal: Principal = Depends(caller), state: Serving = Depends(serving)
) -> Response:
    """Continue a prompt at the key's tier (`{"prompt": "...", "max_tokens": 32}`); with
    `"stream": true`, as server-sent events. Temperature 0 or absent is greedy; above 0 samples
    with `seed` (derived from the key and the prompt when absent: a repeated request repeats
    its text)."""
    with _tier_on_errors(principal):
        body = await _read(request, CompletionRequest, state.config.max_body_bytes)
        tokenizer = _tokenizer(state)
        if not body.prompt.strip():
            raise ApiError(
                400,
                "empty_prompt",
                "the prompt is empty: send the text to continue",
                param="prompt",
            )
        prompt = encode_prompt(tokenizer, body.prompt)
        return await _complete(state, principal, body, prompt, body.prompt, chat=False)


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    openapi_extra=_body_doc(ChatCompletionRequest),
)
async def chat_completions(
    request: Request, principal: Principal = Depends(caller), state: Serving = Depends(serving)
) -> Response:
    """Answer a conversation (`{"messages": [{"role": "user", "content": "..."}]}`) at the
    key's tier, through the model's chat template; with `"stream": true`, as server-sent
    events of `chat.completion.chunk` objects ending with `data: [DONE]`."""
    with _tier_on_errors(principal):
        body = await _read(request, ChatCompletionRequest, state.config.max_body_bytes)
        tokenizer = _tokenizer(state)
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        if not any(m["content"].strip() for m in messages):
            raise ApiError(
                400, "empty_prompt", "every message is empty: say something", param="messages"
            )
        prompt = encode_chat(tokenizer, messages)
        seed_text = json.dumps(messages, sort_keys=True)
        return await _complete(state, principal, body, prompt, seed_text, chat=True)


# --- one completion ----------------------------------------------------------------------------
@dataclass
class _Run:
    """A completion in flight: its row of a generate call, its text and its tokens."""

    state: Serving
    principal: Principal
    stream: RowStream
    text: Detokenizer
    prompt_tokens: int
    reservation: TokenReservation | None
    chat: bool
    id: str
    created: int
    settled: bool = False

    @property
    def model(self) -> str:
        return self.state.served.model.model_name

    @property
    def headers(self) -> dict[str, str]:
        extra = self.reservation.headers if self.reservation is not None else {}
        return {**self.principal.headers, **extra, TIER_HEADER: self.principal.tier}

    def usage(self) -> Usage:
        made = len(self.text.ids) + self.stream.eos  # the end token was made, not sent
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=made,
            total_tokens=self.prompt_tokens + made,
        )

    def finish_reason(self) -> str:
        return "stop" if self.text.stopped else self.stream.finish_reason or "stop"

    def settle(self) -> None:
        """Stop the row, give back the tokens it did not use and meter those it did (once)."""
        self.stream.stop()
        if self.settled:
            return
        self.settled = True
        used = self.usage().total_tokens
        self.state.engine.settle_tokens(self.reservation, used)
        self.state.usage.record_tokens(self.principal.key.id, self.principal.tier, used)

    async def tokens(self) -> AsyncIterator[str]:
        """The text as it decodes, chunk by chunk (cut at the first stop string)."""
        async for token in self.stream:
            chunk = self.text.add(token)
            if chunk:
                yield chunk
            if self.text.stopped:
                break
        tail = self.text.flush()
        if tail:
            yield tail

    def chunk(self, text: str | None, finish: str | None = None, role: bool = False) -> dict:
        """One streamed chunk in OpenAI's shape."""
        base = {"id": self.id, "created": self.created, "model": self.model}
        if not self.chat:
            choice = {"index": 0, "text": text or "", "finish_reason": finish}
            return {**base, "object": "text_completion", "choices": [choice], "tier": self.tier}
        delta: dict[str, str] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return {**base, "object": "chat.completion.chunk", "choices": [choice], "tier": self.tier}

    @property
    def tier(self) -> str:
        return self.principal.tier


async def _complete(
    state: Serving,
    principal: Principal,
    body: CompletionRequest | ChatCompletionRequest,
    prompt: list[int],
    seed_text: str,
    *,
    chat: bool,
) -> Response:
    """Check the request against the server's limits, charge its tokens, queue its row and
    answer (whole, or streamed)."""
    job = _job(state, principal, body, prompt, seed_text)
    reservation = state.auth.reserve_tokens(principal, len(prompt), job.max_new_tokens)
    assert state.generation is not None  # built by create_app for every text-generation model
    run = _Run(
        state,
        principal,
        state.generation.submit(job),
        Detokenizer(state.served.tokenizer, body.stop or []),
        len(prompt),
        reservation,
        chat,
        f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
        int(time.time()),
    )
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        headers = {**run.headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(
            _events(run, include_usage), media_type="text/event-stream", headers=headers
        )
    try:
        text = "".join([chunk async for chunk in run.tokens()])
    except Exception as err:
        raise _failed(err) from err
    finally:
        run.settle()
    common = {"id": run.id, "created": run.created, "model": run.model, "tier": run.tier}
    finish = run.finish_reason()
    answer: BaseModel
    if chat:
        message = AssistantMessage(content=text)
        choice = ChatChoice(message=message, finish_reason=finish)  # type: ignore[arg-type]
        answer = ChatCompletionResponse(**common, choices=[choice], usage=run.usage())
    else:
        plain = CompletionChoice(text=text, finish_reason=finish)  # type: ignore[arg-type]
        answer = CompletionResponse(**common, choices=[plain], usage=run.usage())
    return JSONResponse(answer.model_dump(), headers=run.headers)


async def _events(run: _Run, include_usage: bool) -> AsyncIterator[str]:
    """The server-sent events of a streamed completion, ending with ``data: [DONE]``; a
    failure mid-stream ends it with an error event (the status line has gone already)."""
    try:
        if run.chat:
            yield sse(run.chunk("", role=True))
        async for text in run.tokens():
            yield sse(run.chunk(text))
        yield sse(run.chunk(None if run.chat else "", run.finish_reason()))
        if include_usage:
            usage = {**run.chunk(None), "choices": [], "usage": run.usage().model_dump()}
            yield sse(usage)
        yield sse("[DONE]")
    except Exception as err:
        failure = _failed(err)
        yield sse(openai_error(failure.status, failure.code, failure.detail))
    finally:
        run.settle()


def _failed(err: Exception) -> ApiError:
    """A failed ``generate`` call as the answer's error (logged with its traceback)."""
    logger.error("generation failed", exc_info=err)
    detail = f"generation failed on the server ({type(err).__name__}); retry the request"
    return ApiError(500, "generation_failed", detail)


def _job(
    state: Serving,
    principal: Principal,
    body: CompletionRequest | ChatCompletionRequest,
    prompt: list[int],
    seed_text: str,
) -> GenerationJob:
    """The request's row: its token budget checked against the server's limits and the model's
    context, its sampling and seed."""
    config, served = state.config, state.served
    field = "prompt" if isinstance(body, CompletionRequest) else "messages"
    asked = body.max_tokens
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        if asked is not None and asked != body.max_completion_tokens:
            raise ApiError(
                400,
                "invalid_request",
                "max_tokens and max_completion_tokens differ: send one of them",
                param="max_tokens",
            )
        asked = body.max_completion_tokens
    if body.model is not None and body.model != served.model.model_name:
        raise ApiError(
            404,
            "model_not_found",
            f"this server serves the model {served.model.model_name!r}, not {body.model!r}: "
            f'send "model": "{served.model.model_name}" or leave model out',
            param="model",
        )
    if asked is not None and asked > config.max_tokens:
        raise ApiError(
            400,
            "max_tokens_too_large",
            f"max_tokens is {asked}; this server makes at most {config.max_tokens} tokens per "
            "request: lower it",
            param="max_tokens",
        )
    if not prompt:
        raise ApiError(400, "empty_prompt", "the prompt has no tokens: send some text", param=field)
    context = served.context_length
    room = None if context is None else context - len(prompt)
    max_tokens = asked or config.default_max_tokens
    if asked is None and room is not None and room >= 1:
        max_tokens = min(max_tokens, room)  # the default shrinks to fit the context
    most = config.max_prompt_tokens
    if context is not None:
        most = min(most or context, context - max_tokens)
    if most is not None and len(prompt) > most:
        why = (
            f"the model's context of {context} tokens less max_tokens {max_tokens}"
            if most != config.max_prompt_tokens
            else "this server's limit"
        )
        raise ApiError(
            400,
            "prompt_too_long",
            f"the prompt is {len(prompt)} tokens; at most {max(most, 0)} fit ({why}): shorten "
            "it or lower max_tokens",
            param=field,
        )
    seed = body.seed if body.seed is not None else derived_seed(principal.key.id, seed_text)
    return GenerationJob(
        prompt,
        principal.tier,
        max_tokens,
        temperature=body.temperature or None,
        top_p=body.top_p,
        seed=seed,
    )


# --- reading the request -----------------------------------------------------------------------
@contextmanager
def _tier_on_errors(principal: Principal) -> Iterator[None]:
    """Errors after the key was checked carry the tier (``X-Tier``) and the policy's headers."""
    try:
        yield
    except ApiError as err:
        err.headers = {**principal.headers, TIER_HEADER: principal.tier, **err.headers}
        raise


def _tokenizer(state: Serving) -> Any:
    tokenizer = state.served.tokenizer
    if tokenizer is None:
        raise ApiError(
            503,
            "no_tokenizer",
            "this server has the language model but not its tokenizer: save it in "
            "<artifact>/tokenizer (tokenizer.save_pretrained) or pass create_app(tokenizer=...)",
        )
    return tokenizer


async def _read(request: Request, schema: type[RequestT], max_body_bytes: int) -> RequestT:
    """The JSON body as ``schema``, refusing unknown and unsupported fields by name (400)."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the request as application/json")
    try:
        raw = await request.body()
    except BodyTooLarge:
        raise ApiError(*body_too_large(max_body_bytes)) from None
    try:
        data = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_request", "the body must be a JSON object")
    for name in data:
        if name in REFUSED_FIELDS:
            raise ApiError(400, "unsupported_field", f"{name}: {REFUSED_FIELDS[name]}", param=name)
        if name not in schema.model_fields:
            known = ", ".join(schema.model_fields)
            raise ApiError(
                400,
                "unknown_field",
                f"unknown field {name!r}; this endpoint takes: {known}",
                param=name,
            )
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in err.errors()
        )
        raise ApiError(
            400, "invalid_request", f"the request is not valid: {problems}", param=where
        ) from None
