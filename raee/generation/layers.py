"""A decoder layer split where a per-token exit needs it: the pre-attention norm, keys and values, queries,
and everything after attention (output projection, residuals, feed-forward).

With token-level exits a layer computes, for every token of the sequence, its keys and values (from its
current state: a token that exited below this layer contributes keys and values of its copied state), but
queries, the attention output and the feed-forward only for the tokens still active. The Hugging Face layer
computes all of them for every token it is given, so each family's layer is taken apart here, reusing the
model's own modules (projections, norms, MLP, rotary tables); the tests check that running every token
through these parts equals the model's own layers and ``generate``.

Families: the Llama family (Llama, Mistral, Qwen2/3, Gemma 1: pre-norm, rotary, grouped-query attention,
optional q/k norms), Gemma-2/3 (extra post-attention / pre- and post-feed-forward norms, q/k norms, a
rotary table and an attention window per layer kind, optional attention-logit soft-capping) and GPT-2
(absolute positions, fused Conv1D projections).

Shapes: B batch rows, N tokens of a step, n active tokens (packed), H hidden size, Hq / Hkv query /
key-value heads, D head size.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from raee.backbones.base import LayerwiseBackbone
from raee.backbones.decoder import GPT2Backbone, LlamaBackbone
from raee.backbones.gemma import GemmaBackbone
from raee.errors import UserError

#: rotary tables of one step: layer kind -> (cos, sin), each (B, N, D); None for absolute positions
Rotary = dict[str, tuple[torch.Tensor, torch.Tensor]] | None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (..., heads, D) with cos/sin (..., D) of the same leading shape."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return x * cos + rotate_half(x) * sin


class DecoderOps(ABC):
    """One decoder family's layers, in the parts a token-level exit needs. Holds references to the model's modules
    (no copies), so fine-tuned weights are used as they change."""

    def __init__(self, backbone: LayerwiseBackbone) -> None:
        self.backbone = backbone
        self.model = backbone.model
        self.config = backbone.model.config
        self.num_layers = backbone.num_layers
        self.layers = backbone.layer_modules()
        self._settings: dict[int, tuple[int | None, float, float | None]] = {}

    def settings(self, layer: int) -> tuple[int | None, float, float | None]:
        """(window, scaling, soft cap) of ``layer``, read from the config once (a config lookup costs ~20 us, and
        a decoding step asks every layer)."""
        found = self._settings.get(layer)
        if found is None:
            found = self._settings[layer] = (self.window(layer), self.scaling(layer), self.softcap(layer))
        return found

    # ---------------------------------------------------------------- sizes
    @property
    def hidden_size(self) -> int:
        return self.backbone.hidden_size

    @property
    @abstractmethod
    def num_heads(self) -> int: ...

    @property
    @abstractmethod
    def num_kv_heads(self) -> int: ...

    @property
    @abstractmethod
    def head_dim(self) -> int: ...

    @property
    @abstractmethod
    def intermediate_size(self) -> int: ...

    #: multiply-adds of the feed-forward per token are ffn_matrices x H x I (3 for gated MLPs, 2 for GPT-2)
    ffn_matrices: int = 3

    # ---------------------------------------------------------------- per-layer settings
    def window(self, layer: int) -> int | None:
        """Attention window of ``layer`` (1-based): a query attends to keys at most window-1 positions back;
        None = every earlier position."""
        return None

    def scaling(self, layer: int) -> float:
        return float(self.layers[layer - 1].self_attn.scaling)

    def softcap(self, layer: int) -> float | None:
        """Attention-logit soft-capping (Gemma-2); None for plain softmax attention."""
        return None

    def attention_dropout(self, layer: int) -> float:
        return 0.0

    # ---------------------------------------------------------------- parts
    @abstractmethod
    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, N) ids at (B, N) positions -> (B, N, H) layer-0 states."""

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> Rotary:
        """The rotary tables of ``positions`` (B, N) for every layer kind (None: absolute positions)."""
        return None

    def layer_rotary(self, rotary: Rotary, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if rotary is None else rotary["all"]

    @abstractmethod
    def attn_norm(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Pre-attention norm of (..., H) states."""

    @abstractmethod
    def keys_values(self, layer: int, normed: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor] | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, H) normed states -> keys and values (B, Hkv, N, D), rotary applied to the keys."""

    @abstractmethod
    def queries(self, layer: int, normed: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor] | None
                ) -> torch.Tensor:
        """(n, H) normed states of the active tokens -> queries (n, Hq, D), rotary applied (cos/sin (n, D))."""

    @abstractmethod
    def after_attention(self, layer: int, residual: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """(n, H) layer inputs and (n, Hq*D) attention context of the active tokens -> (n, H) layer outputs."""


class LlamaOps(DecoderOps):
    """Llama, Mistral, Qwen2/3 and Gemma 1: x + attn(norm(x)), then + mlp(norm(.))."""

    @property
    def num_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.num_heads)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.config, "head_dim", None) or self.hidden_size // self.num_heads)

    @property
    def intermediate_size(self) -> int:
        return int(self.config.intermediate_size)

    def window(self, layer: int) -> int | None:
        kinds = getattr(self.config, "layer_types", None)
        window = getattr(self.config, "sliding_window", None)
        if not window:
            return None
        if kinds is not None:
            return int(window) if kinds[layer - 1] == "sliding_attention" else None
        return int(window) if getattr(self.config, "use_sliding_window", True) else None

    def attention_dropout(self, layer: int) -> float:
        return float(getattr(self.config, "attention_dropout", 0.0) or 0.0)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> Rotary:
        return {"all": self.model.rotary_emb(hidden, position_ids=positions)}

    def attn_norm(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.layers[layer - 1].input_layernorm(hidden)

    def _heads(self, x: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
        x = x.view(*x.shape[:-1], -1, self.head_dim)
        return norm(x) if norm is not None else x

    def keys_values(self, layer, normed, rot):
        attn = self.layers[layer - 1].self_attn
        k = self._heads(attn.k_proj(normed), getattr(attn, "k_norm", None))
        v = self._heads(attn.v_proj(normed), None)
        if rot is not None:
            k = rope(k, *rot)
        return k.transpose(1, 2), v.transpose(1, 2)

    def queries(self, layer, normed, rot):
        attn = self.layers[layer - 1].self_attn
        q = self._heads(attn.q_proj(normed), getattr(attn, "q_norm", None))
        return rope(q, *rot) if rot is not None else q

    def after_attention(self, layer, residual, context):
        module = self.layers[layer - 1]
        hidden = residual + module.self_attn.o_proj(context)
        return hidden + module.mlp(module.post_attention_layernorm(hidden))


class GemmaOps(LlamaOps):
    """Gemma-2 and Gemma-3: norms after attention and around the feed-forward, q/k norms, per-kind rotary tables and
    windows (``config.layer_types``), attention-logit soft-capping on Gemma-2."""

    def __init__(self, backbone: LayerwiseBackbone) -> None:
        super().__init__(backbone)
        self.layer_types = list(self.config.layer_types)

    def window(self, layer: int) -> int | None:
        return int(self.config.sliding_window) if self.layer_types[layer - 1] == "sliding_attention" else None

    def softcap(self, layer: int) -> float | None:
        return getattr(self.config, "attn_logit_softcapping", None)

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> Rotary:
        rotary = self.model.rotary_emb
        if hasattr(rotary, "layer_types"):  # Gemma-3: one table per layer kind
            return {kind: rotary(hidden, positions, kind) for kind in set(self.layer_types)}
        return {"all": rotary(hidden, positions)}

    def layer_rotary(self, rotary: Rotary, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return rotary.get(self.layer_types[layer - 1], rotary.get("all"))

    def after_attention(self, layer, residual, context):
        module = self.layers[layer - 1]
        hidden = residual + module.post_attention_layernorm(module.self_attn.o_proj(context))
        return hidden + module.post_feedforward_layernorm(module.mlp(module.pre_feedforward_layernorm(hidden)))


class GPT2Ops(DecoderOps):
    """GPT-2: absolute position embeddings, fused q/k/v (Conv1D, y = x W + b), LayerNorm before each block."""

    ffn_matrices = 2

    @property
    def num_heads(self) -> int:
        return int(self.config.n_head)

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def intermediate_size(self) -> int:
        return int(self.config.n_inner or 4 * self.hidden_size)

    def scaling(self, layer: int) -> float:
        return float(self.layers[layer - 1].attn.scaling)

    def attention_dropout(self, layer: int) -> float:
        return float(self.layers[layer - 1].attn.attn_dropout.p)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.drop(self.model.wte(input_ids) + self.model.wpe(positions))

    def attn_norm(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.layers[layer - 1].ln_1(hidden)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.num_heads, self.head_dim)

    def _project(self, layer: int, x: torch.Tensor, columns: slice) -> torch.Tensor:
        """x (..., H) times the chosen columns of the fused q/k/v Conv1D (y = x W + b)."""
        c_attn = self.layers[layer - 1].attn.c_attn
        flat = torch.addmm(c_attn.bias[columns], x.reshape(-1, x.shape[-1]), c_attn.weight[:, columns])
        return flat.view(*x.shape[:-1], -1)

    def keys_values(self, layer, normed, rot):
        H = self.hidden_size
        k, v = self._project(layer, normed, slice(H, 3 * H)).split(H, dim=-1)
        return self._split(k).transpose(1, 2), self._split(v).transpose(1, 2)

    def queries(self, layer, normed, rot):
        return self._split(self._project(layer, normed, slice(0, self.hidden_size)))

    def after_attention(self, layer, residual, context):
        block = self.layers[layer - 1]
        hidden = residual + block.attn.resid_dropout(block.attn.c_proj(context))
        return hidden + block.mlp(block.ln_2(hidden))


def decoder_ops(backbone: LayerwiseBackbone) -> DecoderOps:
    """The parts of ``backbone``'s layers, or a clear error for a backbone that cannot generate."""
    if not backbone.is_decoder:
        raise UserError(f"backbone '{backbone.name}' is a bidirectional encoder: generation needs a causal decoder "
                        "(backbone=smollm2, gemma3_270m, gpt2, or a tiny_* decoder)")
    cached = backbone.__dict__.get("_decoder_ops")
    if cached is not None:
        return cached
    if isinstance(backbone, GemmaBackbone):
        ops: DecoderOps = GemmaOps(backbone)
    elif isinstance(backbone, LlamaBackbone):
        ops = LlamaOps(backbone)
    elif isinstance(backbone, GPT2Backbone):
        ops = GPT2Ops(backbone)
    else:
        raise UserError(f"token-level decoding supports the Llama family, Gemma-2/3 and GPT-2 backbones, not "
                        f"{type(backbone).__name__}: add a DecoderOps subclass in raee/generation/layers.py")
    backbone.__dict__["_decoder_ops"] = ops  # not a submodule: plain attribute, no state_dict entry
    return ops


def attend(ops: DecoderOps, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           mask: torch.Tensor | None, training: bool = False) -> torch.Tensor:
    """Attention of queries (B, Hq, Nq, D) over keys/values (B, Hkv, S, D); mask (B, 1, Nq, S) bool (True = may
    attend) or None (every key). Returns the context (B, Nq, Hq * D)."""
    _, scale, cap = ops.settings(layer)
    dropout = ops.attention_dropout(layer) if training else 0.0
    if cap is None:
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale,
                                                 enable_gqa=k.shape[1] != q.shape[1])
    else:  # soft-capped logits (Gemma-2): SDPA has no hook for them
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.tanh(q @ k.transpose(-1, -2) * scale / cap) * cap
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = F.dropout(torch.softmax(scores.float(), dim=-1).to(q.dtype), p=dropout, training=training)
        context = weights @ v
    return context.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def describe_ops(ops: DecoderOps) -> dict[str, Any]:
    return {"family": type(ops).__name__, "layers": ops.num_layers, "hidden": ops.hidden_size,
            "heads": ops.num_heads, "kv_heads": ops.num_kv_heads, "head_dim": ops.head_dim,
            "intermediate": ops.intermediate_size}
