"""One encoder layer with token-level exits, and its FLOPs count.

A token whose exit layer is >= ``layer`` is *active* and updated by this layer; every other
token is frozen: its hidden state is copied unchanged. Queries, the attention output
projection + LayerNorm and the feed-forward run only on the active tokens (gathered into a
packed (N, H) tensor); keys and values come from every token's current state (frozen tokens
are re-projected by each layer, as in the authors' code). Unlike their code, padding is
masked out of attention, so a token's result does not depend on its batch.

Works with BERT-style layers (BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, MiniLM: the
``attention.self`` / ``attention.output`` / ``intermediate`` / ``output`` layout) and DistilBERT's
``TransformerBlock``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from raee.backbones.base import LayerState, LayerwiseBackbone
from raee.errors import UserError


@dataclass
class LayerParts:
    """The sub-modules of one post-norm encoder layer, under family-independent names."""

    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    num_heads: int
    scaling: float
    attn_dropout: float  # attention-probability dropout (training only)
    attn_out: nn.Linear
    attn_out_dropout: nn.Module
    attn_norm: nn.LayerNorm
    ffn_in: nn.Linear
    act: Callable[[torch.Tensor], torch.Tensor]
    ffn_out: nn.Linear
    ffn_dropout: nn.Module
    ffn_norm: nn.LayerNorm

    @property
    def hidden_size(self) -> int:
        return self.query.in_features

    @property
    def intermediate_size(self) -> int:
        return self.ffn_in.out_features


def layer_parts(module: nn.Module) -> LayerParts:
    """Name the parts of a BERT-style layer or a DistilBERT block; a clear error for anything else."""
    attention = getattr(module, "attention", None)
    if attention is not None and hasattr(attention, "self") and hasattr(module, "intermediate"):
        sa, so = attention.self, attention.output
        if getattr(module, "is_decoder", False) or getattr(sa, "is_causal", False):
            raise UserError("token-level exits need a bidirectional encoder layer; this BERT layer is causal")
        return LayerParts(query=sa.query, key=sa.key, value=sa.value, num_heads=sa.num_attention_heads,
                          scaling=float(sa.scaling), attn_dropout=float(sa.dropout.p), attn_out=so.dense,
                          attn_out_dropout=so.dropout, attn_norm=so.LayerNorm, ffn_in=module.intermediate.dense,
                          act=module.intermediate.intermediate_act_fn, ffn_out=module.output.dense,
                          ffn_dropout=module.output.dropout, ffn_norm=module.output.LayerNorm)
    if attention is not None and hasattr(attention, "q_lin") and hasattr(module, "ffn"):  # DistilBERT
        return LayerParts(query=attention.q_lin, key=attention.k_lin, value=attention.v_lin,
                          num_heads=attention.n_heads, scaling=float(attention.scaling),
                          attn_dropout=float(attention.dropout.p), attn_out=attention.out_lin,
                          attn_out_dropout=nn.Identity(), attn_norm=module.sa_layer_norm, ffn_in=module.ffn.lin1,
                          act=module.ffn.activation, ffn_out=module.ffn.lin2, ffn_dropout=module.ffn.dropout,
                          ffn_norm=module.output_layer_norm)
    raise UserError(
        f"token-level exits (HashEE) support BERT-family encoder layers (BERT, RoBERTa, XLM-R, ELECTRA, MiniLM) "
        f"and DistilBERT, not {type(module).__name__}: use one of those backbones")


def active_tokens(attention_mask: torch.Tensor, token_exit: torch.Tensor, layer: int) -> torch.Tensor:
    """(B, T) bool: real tokens whose exit layer is >= ``layer`` (they are updated by it)."""
    return attention_mask.bool() & (token_exit.to(attention_mask.device) >= layer)


def run_token_exit_layer(backbone: LayerwiseBackbone, layer: int, state: LayerState,
                         token_exit: torch.Tensor) -> torch.Tensor:
    """Run encoder layer ``layer`` (1-based) on the active tokens of ``state``.

    state.hidden: (B, T, H) output of layer ``layer - 1``; token_exit: (B, T) exit layer of each
    token (1..L). Returns the (B, T, H) output of layer ``layer``: active tokens updated, frozen
    tokens and padding copied unchanged. Keeps gradients when grad is enabled (fine-tuning).
    """
    parts = layer_parts(backbone.layer_modules()[layer - 1])
    hidden = state.hidden
    real = state.attention_mask.bool()
    active = active_tokens(state.attention_mask, token_exit, layer)
    if not bool(active.any()):
        return hidden
    B, T, _ = hidden.shape
    heads = parts.num_heads
    width = parts.query.out_features
    head_dim = width // heads

    # keys and values from every token's current state (frozen ones included)
    k = parts.key(hidden).view(B, T, heads, head_dim).transpose(1, 2)
    v = parts.value(hidden).view(B, T, heads, head_dim).transpose(1, 2)

    # queries only for active tokens: packed (N, H), then laid out per example in Ta slots
    x = hidden[active]  # (N, H), row-major: example by example, positions in order
    counts = active.sum(1)  # (B,)
    slots = torch.arange(int(counts.max()), device=hidden.device) < counts.unsqueeze(1)  # (B, Ta)
    q_packed = parts.query(x)  # (N, H)
    q = q_packed.new_zeros(B, slots.shape[1], width)
    q[slots] = q_packed
    q = q.view(B, -1, heads, head_dim).transpose(1, 2)  # (B, heads, Ta, hd)

    training = parts.query.training
    context = F.scaled_dot_product_attention(
        q, k, v, attn_mask=real[:, None, None, :],  # why: padding never attended (the authors' code attends to it)
        dropout_p=parts.attn_dropout if training else 0.0, scale=parts.scaling)
    context = context.transpose(1, 2).reshape(B, -1, width)[slots]  # (N, H), same order as x

    attended = parts.attn_norm(parts.attn_out_dropout(parts.attn_out(context)) + x)
    out = parts.ffn_norm(parts.ffn_dropout(parts.ffn_out(parts.act(parts.ffn_in(attended)))) + attended)

    new = hidden.clone()
    new[active] = out.to(hidden.dtype)
    return new


#: how a batch's tokens get their exit layers: a (V,) map of token id -> layer, or a function of
#: (input_ids (B, T), attention_mask (B, T)) -> (B, T) exit layers (the per-occurrence hash)
TokenExits = torch.Tensor | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def token_exit_layers(exits: TokenExits, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) exit layer of every token of a batch, from a (V,) map or an assignment function."""
    if callable(exits):
        return exits(input_ids, attention_mask).to(input_ids.device)
    return exits.to(input_ids.device)[input_ids]


def forward_with_token_exits(backbone: LayerwiseBackbone, inputs: dict[str, torch.Tensor],
                             exits: TokenExits) -> LayerState:
    """Embed ``inputs`` (tokenised batch) and run all L layers with token exits; returns layer L's state.

    exits: (V,) exit layer per token id, or a function giving (B, T) exit layers (see :data:`TokenExits`).
    Used for fine-tuning and as a reference in tests.
    """
    state = backbone.embed(**inputs)
    token_exit = token_exit_layers(exits, state.input_ids, state.attention_mask)
    for layer in range(1, backbone.num_layers + 1):
        hidden = run_token_exit_layer(backbone, layer, state, token_exit)
        state = LayerState(hidden=hidden, attention_mask=state.attention_mask, input_ids=state.input_ids,
                           layer=layer, extras=state.extras)
    return state


# ---------------------------------------------------------------------------- FLOPs
def token_exit_macs(attention_mask: torch.Tensor, active: torch.Tensor | None, hidden_size: int,
                    intermediate_size: int) -> int:
    """Multiply-adds of one layer's matrix products, counted as ptflops counts Linear layers.

    attention_mask: (B, T) real tokens; active: (B, T) tokens updated by the layer (None = every
    real token, the full model). Per example with n real and a active tokens:
    K and V projections 2 n H^2, Q a H^2, scores and weighted sum 2 a n H, output projection
    a H^2, feed-forward 2 a H I. Biases, LayerNorm, softmax and activations are left out.
    """
    real = attention_mask.bool()
    active = real if active is None else (active.bool() & real)
    n = real.sum(1).long()
    a = active.sum(1).long()
    H, I = int(hidden_size), int(intermediate_size)
    per_example = 2 * n * H * H + a * H * H + 2 * a * n * H + a * H * H + 2 * a * H * I
    return int(per_example.sum())


def token_exit_flops(attention_mask: torch.Tensor, active: torch.Tensor | None, hidden_size: int,
                     intermediate_size: int) -> int:
    """FLOPs = 2 x multiply-adds (ptflops' convention) of :func:`token_exit_macs`."""
    return 2 * token_exit_macs(attention_mask, active, hidden_size, intermediate_size)
