"""Small random changes of an image batch, as an attacker sends them: shifts, rotations, scalings,
flips (where the task allows) and Gaussian noise.

Classification copies may use any of them. Segmentation copies use only changes whose effect on a
per-pixel map can be undone (whole-pixel shifts and flips) plus noise: :meth:`Perturbation.invert`
maps a copy's per-pixel scores back onto the original pixel grid, and :meth:`Perturbation.valid`
says which pixels of the original the copy saw (a shift loses a border).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF


@dataclass(frozen=True)
class AugmentConfig:
    """How far an attacker's copies stray from the original.

    Args:
        max_shift: largest shift per axis, as a share of the image side (rounded to whole pixels,
            at least one).
        max_rotation: largest rotation in degrees (classification only).
        max_scale: largest relative change of scale, e.g. 0.05 for x0.95 to x1.05
            (classification only).
        noise: Gaussian noise standard deviation, as a share of each image's own spread.
        flips: horizontal flips (off for digits: a flipped 2 is not a 2).
    """

    max_shift: float = 1 / 16
    max_rotation: float = 5.0
    max_scale: float = 0.05
    noise: float = 0.02
    flips: bool = True

    def __post_init__(self) -> None:
        for name in ("max_shift", "max_rotation", "max_scale", "noise"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"augmentation {name} must not be negative, got {getattr(self, name)}"
                )
        if self.max_scale >= 1:
            raise ValueError(f"max_scale must lie in [0, 1), got {self.max_scale}")


@dataclass(frozen=True)
class Perturbation:
    """One random change, applied alike to every image of a batch.

    Args:
        shift: whole-pixel shift ``(dx, dy)`` (right and down are positive).
        angle: rotation in degrees (counter-clockwise).
        scale: zoom factor.
        flip: mirror left to right.
        noise: noise standard deviation, as a share of each image's spread.
        seed: seed of the noise.
    """

    shift: tuple[int, int] = (0, 0)
    angle: float = 0.0
    scale: float = 1.0
    flip: bool = False
    noise: float = 0.0
    seed: int = 0

    @property
    def is_invertible(self) -> bool:
        """Whether per-pixel maps can be mapped back (no rotation, no scaling)."""
        return self.angle == 0.0 and self.scale == 1.0

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """The changed copy of an image batch ``(N, C, H, W)``.

        Pixels moved in from outside take each image's border value (its background), so a shift
        does not paint a frame the model never saw in training.
        """
        if images.dim() != 4:
            raise ValueError(
                f"augmentation needs an image batch (N, C, H, W), got {tuple(images.shape)}"
            )
        out = images
        if self.is_invertible:
            if self.shift != (0, 0):
                background = _border_mean(images)
                out = _shift(images - background, self.shift) + background
        else:
            background = _border_mean(images)
            out = TF.affine(
                images - background,
                angle=self.angle,
                translate=list(self.shift),
                scale=self.scale,
                shear=[0.0, 0.0],
                interpolation=InterpolationMode.BILINEAR,
                fill=0.0,
            )
            out = out + background
        if self.flip:
            out = TF.horizontal_flip(out)
        if self.noise > 0:
            generator = torch.Generator().manual_seed(self.seed)
            spread = images.flatten(1).std(dim=1).view(-1, 1, 1, 1)
            noise = torch.randn(out.shape, generator=generator, dtype=out.dtype)
            out = out + self.noise * spread * noise.to(out.device)
        return out

    def invert(self, maps: torch.Tensor) -> torch.Tensor:
        """Map per-pixel scores ``(N, K, H, W)`` of a changed copy back onto the original grid.

        Pixels the copy did not see are 0 (see :meth:`valid`).

        Raises:
            ValueError: the change rotates or scales (not invertible pixel for pixel).
        """
        if not self.is_invertible:
            raise ValueError(
                "only whole-pixel shifts and flips can be mapped back; segmentation copies must "
                "not rotate or scale"
            )
        out = TF.horizontal_flip(maps) if self.flip else maps
        if self.shift != (0, 0):
            out = _shift(out, (-self.shift[0], -self.shift[1]))
        return out

    def valid(self, height: int, width: int) -> torch.Tensor:
        """``(H, W)`` booleans: the original pixels that this copy still shows."""
        ones = torch.ones(1, 1, height, width)
        seen = self.invert(self.apply_geometry(ones))
        return seen[0, 0] > 0.5

    def apply_geometry(self, maps: torch.Tensor) -> torch.Tensor:
        """The geometric part of :meth:`apply` alone (zeros move in), for maps and masks."""
        out = _shift(maps, self.shift) if self.shift != (0, 0) else maps
        return TF.horizontal_flip(out) if self.flip else out


def _shift(maps: torch.Tensor, shift: tuple[int, int]) -> torch.Tensor:
    """Move maps by whole pixels ``(dx, dy)``, exactly; zeros move in."""
    dx, dy = shift
    height, width = maps.shape[-2:]
    padded = TF.pad(maps, [max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)], fill=0.0)
    return TF.crop(padded, max(-dy, 0), max(-dx, 0), height, width)


def _border_mean(images: torch.Tensor) -> torch.Tensor:
    """Each image's mean border value per channel, ``(N, C, 1, 1)``."""
    border = torch.cat(
        [images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1
    )
    return border.mean(dim=-1)[..., None, None]


def random_perturbations(
    count: int,
    image_size: tuple[int, int],
    config: AugmentConfig,
    *,
    invertible: bool = False,
    seed: int = 0,
) -> list[Perturbation]:
    """``count`` random changes, the first of them the identity (the attacker's original query).

    Args:
        image_size: ``(H, W)``, to turn the shift share into pixels.
        invertible: only shifts, flips and noise (segmentation).
        seed: fixes every draw.
    """
    generator = torch.Generator().manual_seed(seed)
    height, width = image_size
    max_dx = max(1, round(config.max_shift * width)) if config.max_shift > 0 else 0
    max_dy = max(1, round(config.max_shift * height)) if config.max_shift > 0 else 0
    changes = [Perturbation()]
    for _ in range(count - 1):
        draws = torch.rand(5, generator=generator).tolist()
        dx = int(torch.randint(-max_dx, max_dx + 1, (1,), generator=generator))
        dy = int(torch.randint(-max_dy, max_dy + 1, (1,), generator=generator))
        changes.append(
            Perturbation(
                shift=(dx, dy),
                angle=0.0 if invertible else (2 * draws[0] - 1) * config.max_rotation,
                scale=1.0 if invertible else 1.0 + (2 * draws[1] - 1) * config.max_scale,
                flip=config.flips and draws[2] < 0.5,
                noise=config.noise,
                seed=int(torch.randint(0, 2**31 - 1, (1,), generator=generator)),
            )
        )
    return changes


#: the gentlest change: faint noise alone, below what a person sees and what the model's answer
#: depends on; it still defeats noise drawn from a digest of the exact input
JITTER = AugmentConfig(max_shift=0.0, max_rotation=0.0, max_scale=0.0, noise=0.02, flips=False)
