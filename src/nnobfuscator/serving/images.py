"""Images in and out: decode uploads safely, turn them into model input, encode masks and PNGs."""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import functional as F

from nnobfuscator.core.outputs import read_output
from nnobfuscator.serving.errors import ApiError

ACCEPTED_FORMATS = {"PNG", "JPEG"}


def decode_base64(text: str) -> bytes:
    """Base64 (optionally a ``data:image/...;base64,`` URL) to bytes; 400 when it is not."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(
            400,
            "invalid_base64",
            "the 'image' field is not valid base64: send the PNG/JPEG bytes base64-encoded",
        ) from None


def decode_image(data: bytes, *, max_side: int) -> Image.Image:
    """Open PNG/JPEG bytes as a fully loaded PIL image.

    Raises:
        ApiError: 400 for empty or corrupt data, 415 for other formats, 422 for oversized images.
    """
    if not data:
        raise ApiError(400, "empty_image", "the image is empty: send the bytes of a PNG or JPEG")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ACCEPTED_FORMATS:
                raise ApiError(
                    415,
                    "unsupported_image_format",
                    f"the image is {image.format}; send PNG or JPEG",
                )
            width, height = image.size
            if max(width, height) > max_side or min(width, height) < 1:
                raise ApiError(
                    422,
                    "image_size",
                    f"the image is {width}x{height} pixels; each side must be 1..{max_side}: "
                    "resize it before sending",
                )
            image.load()
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise ApiError(
            400, "invalid_image", "the image cannot be decoded: send a complete PNG or JPEG file"
        ) from None
    except Image.DecompressionBombWarning:
        raise ApiError(422, "image_size", "the image has too many pixels; resize it") from None
    return image


@dataclass(frozen=True)
class ImageSpec:
    """How an uploaded image becomes one model input ``(C, H, W)``.

    Args:
        channels: 1 (grayscale) or 3 (RGB).
        size: ``(height, width)`` the model takes, or ``None`` to keep the image's own size.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        crop: resize the shorter side then centre-crop (ImageFolder style) instead of stretching.
    """

    channels: int = 3
    size: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    crop: bool = True

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("L" if self.channels == 1 else "RGB")
        if self.size is not None:
            if self.crop:
                image = F.center_crop(F.resize(image, min(self.size)), list(self.size))
            else:
                image = image.resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
        tensor = F.to_tensor(image)
        mean = torch.tensor(self.mean[: self.channels]).view(-1, 1, 1)
        std = torch.tensor(self.std[: self.channels]).view(-1, 1, 1)
        return (tensor - mean) / std


def encode_png(array: np.ndarray | Image.Image) -> bytes:
    """PNG bytes of a PIL image or an ``(H, W)`` / ``(H, W, C)`` uint8 array."""
    image = array if isinstance(array, Image.Image) else Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def mask_of(output: Any) -> torch.Tensor:
    """A class mask ``(H, W)`` from one sample's segmentation output (logits ``(C, H, W)`` or a
    torchvision ``{"out": ...}`` dict)."""
    output = read_output(output)
    if output.dim() != 3:
        raise TypeError(
            "a segmentation model must return logits (N, C, H, W) or {'out': (N, C, H, W)}"
        )
    return output.argmax(0)


def mask_png(mask: np.ndarray) -> bytes:
    """A class mask as an 8-bit (or 16-bit when classes exceed 255) grayscale PNG."""
    if mask.max(initial=0) > 255:
        return encode_png(Image.fromarray(mask.astype(np.uint16)))
    return encode_png(mask.astype(np.uint8))


def mask_rle(mask: np.ndarray) -> dict[str, list[int]]:
    """Row-major run-length encoding: ``values[i]`` repeated ``counts[i]`` times."""
    flat = mask.reshape(-1)
    if flat.size == 0:
        return {"size": list(mask.shape), "values": [], "counts": []}
    starts = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]])
    counts = np.diff(np.r_[starts, flat.size])
    return {
        "size": list(mask.shape),
        "values": flat[starts].astype(int).tolist(),
        "counts": counts.astype(int).tolist(),
    }


def generated_png(output: Any) -> bytes:
    """PNG bytes of one generated image: a PIL image, a diffusers output, an array or a tensor
    ``(3, H, W)`` with values in [0, 1]."""
    if isinstance(output, Mapping) and "images" in output:  # one sample of a pipeline output
        output = output["images"]
    elif hasattr(output, "images"):
        output = output.images[0]
    if isinstance(output, Image.Image):
        return encode_png(output)
    if isinstance(output, torch.Tensor):
        tensor = output.detach().float().cpu()
        if tensor.dim() == 3 and tensor.shape[0] in (1, 3, 4):
            tensor = tensor.permute(1, 2, 0)
        output = (tensor.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    if isinstance(output, np.ndarray):
        if output.dtype != np.uint8:
            output = (np.clip(output, 0, 1) * 255).round().astype(np.uint8)
        return encode_png(output.squeeze())
    raise TypeError(f"cannot turn a generated {type(output).__name__} into a PNG")
