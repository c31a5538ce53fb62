"""Read request bodies: multipart upload, JSON with base64, or raw image bytes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from nnobfuscator.serving.errors import ApiError
from nnobfuscator.serving.images import decode_base64
from nnobfuscator.serving.middleware import BodyTooLarge, body_too_large
from nnobfuscator.serving.schemas import GenerateRequest, ImageRequest

ModelT = TypeVar("ModelT", bound=BaseModel)
_IMAGE_TYPES = {"image/png", "image/jpeg", "image/jpg"}
_UPLOAD_TYPES = _IMAGE_TYPES | {"application/octet-stream", ""}

# Shown in the OpenAPI docs for endpoints that read the body themselves.
IMAGE_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {"image": {"type": "string", "format": "binary"}},
                }
            },
            "application/json": {"schema": ImageRequest.model_json_schema()},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@dataclass
class ImagePayload:
    """The uploaded image bytes and the options sent with them."""

    data: bytes
    options: dict[str, Any]


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_image_payload(request: Request, max_body_bytes: int) -> ImagePayload:
    """The image of a request: multipart field ``image``, JSON ``{"image": BASE64}`` or a raw
    PNG/JPEG body.

    Raises:
        ApiError: 413 over the size limit, 415 for other content types, 400/422 for bad bodies.
    """
    media = _media_type(request)
    try:
        if media == "multipart/form-data":
            return await _read_multipart(request)
        if media == "application/json":
            body = _validated(ImageRequest, await request.body())
            options = body.model_dump(exclude={"image"}, exclude_none=True)
            return ImagePayload(decode_base64(body.image), options)
        if media in _IMAGE_TYPES:
            return ImagePayload(await request.body(), {})
    except BodyTooLarge:
        raise ApiError(*body_too_large(max_body_bytes)) from None
    raise ApiError(
        415,
        "unsupported_media_type",
        f"content type {media or '(none)'!r} is not accepted: upload the image as multipart "
        "field 'image', send JSON {\"image\": BASE64}, or a raw image/png or image/jpeg body",
    )


async def _read_multipart(request: Request) -> ImagePayload:
    try:
        form = await request.form(max_files=1, max_fields=8)
    except MultiPartException as err:
        raise ApiError(
            400, "invalid_multipart", f"the multipart body is malformed: {err}"
        ) from None
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise ApiError(
            422,
            "missing_image",
            "no file in multipart field 'image': send it as `-F image=@photo.png`",
        )
    declared = (upload.content_type or "").split(";")[0].strip().lower()
    if declared not in _UPLOAD_TYPES:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"the uploaded file is {declared!r}; upload a PNG or JPEG image",
        )
    options = {k: v for k, v in form.items() if k != "image" and isinstance(v, str)}
    return ImagePayload(await upload.read(), options)


async def read_prompt(request: Request, max_body_bytes: int, max_chars: int) -> GenerateRequest:
    """A JSON ``{"prompt": "..."}`` body (422 for an empty or too long prompt)."""
    if _media_type(request) != "application/json":
        raise ApiError(415, "unsupported_media_type", 'send JSON: {"prompt": "a red bicycle"}')
    try:
        body = await request.body()
    except BodyTooLarge:
        raise ApiError(*body_too_large(max_body_bytes)) from None
    prompt = _validated(GenerateRequest, body)
    if not prompt.prompt.strip():
        raise ApiError(422, "empty_prompt", "the prompt is empty: say what the image should show")
    if len(prompt.prompt) > max_chars:
        raise ApiError(
            422,
            "prompt_too_long",
            f"the prompt has {len(prompt.prompt)} characters; at most {max_chars}",
        )
    return prompt


def _validated(schema: type[ModelT], body: bytes) -> ModelT:
    try:
        data = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in err.errors()
        )
        raise ApiError(422, "invalid_request", f"the request is not valid: {problems}") from None
