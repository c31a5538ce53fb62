"""Batch normalisation inside blocks that compute strategies run differently (slimmed blocks).

:func:`batch_norm_at` is the one place a slimmed block normalises a hidden activation; it reads the
statistics the active tier uses (re-estimated ones, see
:mod:`nnobfuscator.strategies.bn_reestimate`, or the user's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nnobfuscator.strategies.bn_reestimate import TieredNorm


def batch_norm_at(
    norm: nn.Module, x: torch.Tensor, channels: torch.Tensor | None = None
) -> torch.Tensor:
    """``norm`` (a BatchNorm in eval mode, or its :class:`TieredNorm`) applied to ``x``, which
    holds only ``channels`` of its features (all of them when ``None``)."""
    if isinstance(norm, TieredNorm):
        return norm.normalise(x, channels)
    stats = (norm.running_mean, norm.running_var, norm.weight, norm.bias)
    if channels is not None:
        stats = tuple(None if t is None else t.index_select(0, channels) for t in stats)
    mean, var, scale, shift = stats
    return F.batch_norm(x, mean, var, scale, shift, False, 0.0, norm.eps)
