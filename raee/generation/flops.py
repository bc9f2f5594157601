"""FLOPs of decoding with token-level exits, counted per token, prefill and decode apart.

What is counted (multiply-adds of the matrix products, FLOPs = 2 x multiply-adds as ptflops counts; norms,
rotary, softmax, activations and biases are left out, as in :mod:`raee.hashee.token_layer`):

- per token and layer it is active in (1..its exit layer): the query projection H x Hq·D, attention scores and
  weighted sum 2 x Hq·D x (keys it attends: its position + 1, at most the layer's window), the output
  projection Hq·D x H, the feed-forward m x H x I (m = 3 for gated MLPs, 2 for GPT-2);
- per token and layer whose keys and values are computed (every layer a token is active in, and the layers
  above its exit that later tokens reached: keys/values of its copied state): 2 x H x Hkv·D;
- per LM-head read: V x H (once at a token's exit; CALM's confidence reads the head at every layer it checks).

The full model's count on the same tokens is kept beside it (every token through all L layers, keys and
values at every layer, one head read per generated token), so the FLOPs speed-up compares like with like
whatever text each method generated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from raee.generation.layers import DecoderOps

PHASES = ("prefill", "decode")


class LayerCosts:
    """Per-token multiply-adds of one family's layers (see the module docstring)."""

    def __init__(self, ops: DecoderOps, vocab_size: int) -> None:
        H, hq, hkv, D, I = ops.hidden_size, ops.num_heads, ops.num_kv_heads, ops.head_dim, ops.intermediate_size
        self.num_layers = ops.num_layers
        self.kv = 2 * H * hkv * D
        self.dense = H * hq * D + hq * D * H + ops.ffn_matrices * H * I  # q, o, feed-forward
        self.attend = 2 * hq * D  # per key attended
        self.head = int(vocab_size) * H
        windows = [ops.window(layer) for layer in range(1, ops.num_layers + 1)]
        self.windows = sorted({w for w in windows if w is not None})
        # cumulative counts by exit layer e (index 0..L): layers 1..e without a window / with each window
        self._unwindowed = torch.tensor([0] + [sum(w is None for w in windows[:e]) for e in range(1, len(windows) + 1)])
        self._windowed = {w: torch.tensor([0] + [sum(x == w for x in windows[:e]) for e in range(1, len(windows) + 1)])
                          for w in self.windows}

    def active(self, exits: torch.Tensor, positions: torch.Tensor) -> int:
        """Multiply-adds of the tokens' active layers: exits (n,) exit layers 0..L, positions (n,)."""
        if exits.numel() == 0:
            return 0
        exits, keys = exits.long().cpu(), positions.long().cpu() + 1
        total = exits * self.dense + self.attend * self._unwindowed[exits] * keys
        for w, counts in self._windowed.items():
            total = total + self.attend * counts[exits] * keys.clamp(max=w)
        return int(total.sum())


@dataclass
class FlopsCount:
    """Multiply-adds of a run, per phase: the method's and the full model's on the same tokens, and token counts."""

    macs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    full_macs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    head_reads: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))

    def add_step(self, costs: LayerCosts, phase: str, exits: torch.Tensor, positions: torch.Tensor,
                 kv_rows: int, head_reads: int, reads: int) -> None:
        """One step: exits / positions (n,) of its real tokens, kv_rows token-layer keys/values computed (the lazy
        ones of earlier tokens included), head_reads LM-head reads, reads the tokens whose next token was read."""
        n = int(exits.numel())
        self.macs[phase] += costs.active(exits, positions) + kv_rows * costs.kv + head_reads * costs.head
        full = torch.full_like(exits, costs.num_layers)
        self.full_macs[phase] += costs.active(full, positions) + n * costs.num_layers * costs.kv + reads * costs.head
        self.tokens[phase] += n
        self.head_reads[phase] += head_reads

    def merge(self, other: FlopsCount) -> None:
        for name in ("macs", "full_macs", "tokens", "head_reads"):
            mine, theirs = getattr(self, name), getattr(other, name)
            for phase in PHASES:
                mine[phase] += theirs[phase]

    def summary(self) -> dict[str, Any]:
        """FLOPs per token (prefill: per prompt token; decode: per processed generated token), the full model's on
        the same tokens, and the speed-ups full / method (prefill, decode, both)."""
        out: dict[str, Any] = {}
        for phase in PHASES:
            n = self.tokens[phase]
            out[f"{phase}_flops_per_token"] = 2 * self.macs[phase] / n if n else None
            out[f"{phase}_full_flops_per_token"] = 2 * self.full_macs[phase] / n if n else None
            out[f"{phase}_flops_speedup"] = (self.full_macs[phase] / self.macs[phase]) if self.macs[phase] else None
        total, full = sum(self.macs.values()), sum(self.full_macs.values())
        out["flops"] = 2 * total
        out["full_flops"] = 2 * full
        out["flops_speedup"] = full / total if total else None
        out["head_reads"] = dict(self.head_reads)
        return out
