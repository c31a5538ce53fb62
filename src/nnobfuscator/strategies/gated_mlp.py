"""Slimming gated MLPs (``down(act(gate(x)) * up(x))``: the MLPs of Llama, Mistral, Qwen, Gemma),
found by structure and checked on a probe input."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nnobfuscator.core.tier_pass import DerivedCache
from nnobfuscator.strategies.slim_layers import (
    Space,
    mix_input,
    plain_layer,
    reader_input,
)
from nnobfuscator.strategies.slimmers import Slimmer


class GatedMLPSlimmer(Slimmer):
    """A gated MLP, ``down(act(gate(x)) * up(x))`` (the MLPs of Llama, Mistral, Qwen, Gemma),
    slimmed over its hidden units: the kept rows of ``gate`` and ``up``, the kept columns of
    ``down``, and the dropped units held at their mean, folded into ``down``'s bias."""

    def __init__(
        self,
        block: nn.Module,
        roles: tuple[nn.Module, nn.Module, nn.Module, nn.Module],
        cache: DerivedCache | None = None,
    ) -> None:
        super().__init__(block, cache)
        self.gate, self.up, self.down, self.act = roles

    def spaces(self) -> list[Space]:
        return [(self.down, reader_input, -1)]

    def readers(self) -> list[nn.Module]:
        return [self.down]

    def layers(self) -> list[nn.Module]:
        return [self.gate, self.up, self.down]

    def cut(self, tier: str, keep: float, sources: tuple[torch.Tensor, ...]) -> Any:
        gate, up, down = sources
        (kept,), (dropped,) = self.split(keep, gate.device)
        mean = self.activation_stats()[0][0].to(gate.device, gate.dtype)
        constant = down.index_select(1, dropped) @ mean.index_select(0, dropped)
        biases = [plain_layer(layer).bias for layer in self.layers()]
        return (
            gate.index_select(0, kept).contiguous(),
            None if biases[0] is None else biases[0].index_select(0, kept),
            up.index_select(0, kept).contiguous(),
            None if biases[1] is None else biases[1].index_select(0, kept),
            down.index_select(1, kept).contiguous(),
            constant if biases[2] is None else biases[2] + constant,
            kept,
        )

    def forward(self, x: torch.Tensor, tier: str, keep: float) -> torch.Tensor:
        gate_w, gate_b, up_w, up_b, down_w, down_b, kept = self.sliced(tier, keep)
        gated = self.act(F.linear(mix_input(self.gate, x, -1), gate_w, gate_b))
        hidden = gated * F.linear(mix_input(self.up, x, -1), up_w, up_b)
        return F.linear(mix_input(self.down, hidden, -1, kept), down_w, down_b)

    def held_units(
        self, widths: list[tuple[float, torch.Tensor]], count: int, device: torch.device
    ) -> torch.Tensor:
        """``(count, hidden)``: which hidden units each of ``count`` samples holds at their mean,
        for samples of several widths (``(keep, samples)`` pairs)."""
        hidden = plain_layer(self.down).weight.shape[1]
        held = torch.zeros(count, hidden, dtype=torch.bool, device=device)
        for keep, samples in widths:
            if keep < 1.0:
                (_,), (dropped,) = self.split(keep, device)
                held[samples.unsqueeze(1), dropped.unsqueeze(0)] = True
        return held

    def forward_held(self, x: torch.Tensor, tier: str | None, held: torch.Tensor) -> torch.Tensor:
        """The block once, at full width, each sample's ``held`` hidden units at their mean: the
        function its own width's slices compute, with every weight read once (what a decoding
        step, bound by reading weights, costs); equal to the per-width runs up to float
        rounding."""
        gate_w, up_w, down_w = self.sources(tier)  # type: ignore[arg-type]
        gate_b, up_b, down_b = (plain_layer(layer).bias for layer in self.layers())
        gated = self.act(F.linear(mix_input(self.gate, x, -1), gate_w, gate_b))
        hidden = gated * F.linear(mix_input(self.up, x, -1), up_w, up_b)
        mean = self.activation_stats()[0][0].to(hidden.device, hidden.dtype)
        shape = (x.shape[0],) + (1,) * (hidden.dim() - 2) + (hidden.shape[-1],)
        hidden = torch.where(held.view(shape), mean, hidden)
        return F.linear(mix_input(self.down, hidden, -1), down_w, down_b)


def gated_mlp_roles(module: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module] | None:
    """``(gate, up, down, activation)`` of a gated MLP, found by structure and checked on a probe.

    The module must hold exactly three ``nn.Linear`` children, two reading its input into ``H``
    hidden units and one reading ``H`` back, and one activation child without parameters; then
    one probe input decides which projection is the gate (its output goes through the
    activation), and refuses a module whose output is not ``down(act(gate(x)) * up(x))``.
    """
    if isinstance(module, nn.Sequential | nn.ModuleList):
        return None
    children = list(module.children())
    linears = [m for m in children if isinstance(plain_layer(m), nn.Linear)]
    others = [m for m in children if not isinstance(plain_layer(m), nn.Linear)]
    if len(linears) != 3 or len(others) != 1 or any(True for _ in others[0].parameters()):
        return None
    plain = [plain_layer(m) for m in linears]
    for d in range(3):
        down, (a, b) = plain[d], [plain[i] for i in range(3) if i != d]
        if not (
            a.in_features == b.in_features == down.out_features
            and a.out_features == b.out_features == down.in_features
        ):
            continue
        weight = down.weight
        probe = torch.randn(2, a.in_features, generator=torch.Generator().manual_seed(0))
        probe = probe.to(weight.device, weight.dtype)
        with torch.no_grad():
            try:
                reference = module(probe)
            except Exception:  # noqa: BLE001 - a forward that needs more than a tensor
                return None
            if not isinstance(reference, torch.Tensor):
                return None
            act = others[0]
            for gate, up in ((0, 1), (1, 0)):
                g, u = [i for i in range(3) if i != d][gate], [i for i in range(3) if i != d][up]
                guess = down(act(plain[g](probe)) * plain[u](probe))
                if torch.allclose(guess, reference, rtol=1e-4, atol=1e-5):
                    return linears[g], linears[u], linears[d], act
    return None
