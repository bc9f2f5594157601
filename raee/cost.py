"""Honest cost: every part of an exit method's work in one unit, the backbone layer.

A run's cost is counted in **layer equivalents** (LE): what it computes, divided by what one backbone layer
computes on the same examples.

- **Backbone layers**: the mean number of layers computed per example (``mean_layers_computed``; a key at
  layer l costs l layers for every example, whatever its exit). Backbone-layer keys are paid for here.
- **Keys from a separate encoder** (a sentence encoder over the raw text): its FLOPs at each example's own
  token count, divided by one backbone layer's FLOPs at the example's own (prompted) token count, summed
  over the run: ``key_layer_equivalents`` = sum of key FLOPs / sum of one-layer FLOPs.
- **Retrieval** (search plus aggregation, measured): its seconds divided by the seconds of one backbone layer
  on one example, measured on the full model in the same process (full-model time / (examples x L); the
  embeddings and the head, well under 1% of a full pass here, are spread over the layers).

FLOPs of a transformer layer on T tokens (matrix products only; norms, activations, softmax and the head's
few label rows are left out), with H the hidden size, h_q / h_kv the query / key-value heads of width d, I the
feed-forward width (three matrices when gated, as in Llama and Gemma, else two)::

    2 x [ T x (H h_q d + 2 H h_kv d + h_q d H + m H I)  +  2 h_q d T^2 ]

The attention term counts the whole T x T square (what a dense kernel computes) and ignores sliding windows,
which is exact for inputs shorter than the window (Gemma-3: 512 tokens; our inputs are cut at 128).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from raee.errors import UserError

#: model types whose feed-forward block is gated (gate, up and down projections)
GATED_MLP = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "phi3",
             "olmo", "olmo2", "smollm3")
#: summary timings that count as retrieval overhead (keys are counted by their FLOPs instead)
RETRIEVAL_TIMINGS = ("retrieval_search", "retrieval_aggregate", "retrieval_vote")


@dataclass(frozen=True)
class LayerShape:
    """The sizes of one transformer layer that its FLOPs depend on."""

    hidden: int
    query_heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    gated: bool

    def flops(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) real token counts -> (B,) float64 FLOPs of one layer per example (module docstring)."""
        t = torch.as_tensor(tokens).double()
        q, kv = self.query_heads * self.head_dim, self.kv_heads * self.head_dim
        per_token = self.hidden * q + 2 * self.hidden * kv + q * self.hidden + (3 if self.gated else 2) * self.hidden * self.ffn
        return 2.0 * (per_token * t + 2.0 * q * t * t)


def _first(cfg: Any, *names: str) -> Any:
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return None


def layer_shape(config: Any) -> LayerShape:
    """The :class:`LayerShape` of a transformers config (BERT, DistilBERT, GPT-2, Llama, Gemma families)."""
    cfg = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    hidden = _first(cfg, "hidden_size", "n_embd", "dim")
    heads = _first(cfg, "num_attention_heads", "n_head", "n_heads")
    if hidden is None or heads is None:
        raise UserError(f"cannot count the FLOPs of a {type(cfg).__name__}: it names no hidden size or head count")
    kv = _first(cfg, "num_key_value_heads") or heads
    head_dim = _first(cfg, "head_dim") or int(hidden) // int(heads)
    ffn = _first(cfg, "intermediate_size", "n_inner", "hidden_dim") or 4 * int(hidden)
    return LayerShape(int(hidden), int(heads), int(kv), int(head_dim), int(ffn),
                      str(getattr(cfg, "model_type", "")) in GATED_MLP)


def layer_flops(config: Any, tokens: torch.Tensor) -> torch.Tensor:
    """(B,) FLOPs of one transformer layer of ``config`` on each example's ``tokens`` real tokens."""
    return layer_shape(config).flops(tokens)


def cost_summary(results: dict[str, Any], full_wall_time_s: float | None, num_layers: int) -> dict[str, Any]:
    """The cost fields of a run's summary from its results (:class:`~raee.module.EarlyExitModule`):

    layer_flops_per_example, key_flops_per_example, key_layer_equivalents, retrieval_overhead_s,
    retrieval_layer_equivalents (None without the full model's time), cost_layer_equivalents (layers computed +
    keys + retrieval), cost_speedup (L / that) and wall_per_cost_speedup (wall-clock speed-up / cost_speedup).
    """
    n = int(results.get("num_examples") or 0)
    layer_total = float(results.get("layer_flops") or 0.0)
    key_total = float(results.get("key_flops") or 0.0)
    key_le = key_total / layer_total if layer_total > 0 else 0.0
    timings = results.get("timings") or {}
    overhead = float(sum(timings.get(name, 0.0) for name in RETRIEVAL_TIMINGS))
    retrieval_le = None
    if full_wall_time_s and n and num_layers:
        seconds_per_layer = full_wall_time_s / (n * num_layers)  # one layer on one example, in the same process
        retrieval_le = overhead / n / seconds_per_layer
    layers = results.get("mean_layers_computed")
    if layers is None or not math.isfinite(float(layers)):
        layers = results.get("mean_exit_layer")
    cost = float(layers) + key_le + (retrieval_le or 0.0) if layers is not None else None
    wall = full_wall_time_s / results["wall_time_s"] if full_wall_time_s and results.get("wall_time_s") else None
    speedup = num_layers / cost if cost else None
    return {"layer_flops_per_example": layer_total / n if n else None,
            "key_flops_per_example": key_total / n if n else None,
            "key_layer_equivalents": key_le, "retrieval_overhead_s": overhead,
            "retrieval_layer_equivalents": retrieval_le, "cost_layer_equivalents": cost, "cost_speedup": speedup,
            "wall_per_cost_speedup": wall / speedup if wall and speedup else None}
