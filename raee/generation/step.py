"""One decoder layer with per-token exits, and the differentiable, cache-free forward built from it.

A token whose exit layer is >= ``layer`` is *active*: this layer computes its query, attention output and
feed-forward. Every token (active or not) gets keys and values from its current state: a token that left
below this layer contributes the keys and values of its copied state (CALM's state propagation, HashEE's
frozen tokens), so later tokens attend to it at every layer.

:func:`update_active` is shared by the decoding loop (keys and values from a cache, :mod:`raee.generation.decode`)
and by :func:`forward_with_exits` (teacher forcing: every position at once, gradients kept), so training with
exits in place computes exactly what decoding computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from raee.generation.layers import DecoderOps, Rotary, attend, decoder_ops
from raee.backbones.base import LayerwiseBackbone


@dataclass
class KeyLayout:
    """Where the keys of one step sit: positions (B, S) and validity (B, S) of every key column. Builds the
    attention masks of queries at given positions (causal by position, padding out, a window where the layer has
    one), caching the mask of the step's own query layout per window."""

    positions: torch.Tensor
    valid: torch.Tensor
    all_valid: bool
    _masks: dict = field(default_factory=dict)

    @classmethod
    def of(cls, positions: torch.Tensor, valid: torch.Tensor) -> KeyLayout:
        return cls(positions, valid, bool(valid.all()))

    def mask(self, q_positions: torch.Tensor, window: int | None, *, last: bool = False,
             key: object = None) -> torch.Tensor | None:
        """(B, 1, Nq, S) bool mask for queries at ``q_positions`` (B, Nq); None when every key is allowed.

        last: the queries are the newest tokens (one per row, after every key): causality holds by itself.
        key: cache the mask under this key (the step's own query layout)."""
        if key is not None and (key, window) in self._masks:
            return self._masks[(key, window)]
        span = int(self.positions.shape[1])
        if last and self.all_valid and (window is None or window >= span):
            mask = None
        else:
            k_pos = self.positions[:, None, None, :]
            q_pos = q_positions[:, None, :, None]
            mask = self.valid[:, None, None, :] & (k_pos <= q_pos)
            if window is not None:
                mask = mask & (q_pos - k_pos < window)
        if key is not None:
            self._masks[(key, window)] = mask
        return mask


def update_active(ops: DecoderOps, layer: int, hidden: torch.Tensor, normed: torch.Tensor, active: torch.Tensor,
                  rot: tuple[torch.Tensor, torch.Tensor] | None, q_positions: torch.Tensor, keys: torch.Tensor,
                  values: torch.Tensor, layout: KeyLayout, *, last: bool = False, everyone: bool | None = None,
                  training: bool = False) -> torch.Tensor:
    """Run layer ``layer`` for the active tokens of a step.

    hidden, normed: (B, N, H) the step's layer inputs and their pre-attention norm; active: (B, N) bool;
    rot: the layer's rotary (cos, sin), each (B, N, D), or None; q_positions: (B, N); keys/values: (B, Hkv, S, D)
    of every key column (the step's own tokens included); layout: those columns' positions and validity.
    last: the step's tokens are each row's newest (decoding: N = 1). everyone: whether every token is active
    (saves a check when the caller knows). Returns (B, N, H): active tokens updated, the others unchanged.
    """
    B, N, _ = hidden.shape
    if everyone is None:
        everyone = bool(active.all())
    window = ops.settings(layer)[0]
    if everyone:  # the dense layout: no packing
        q = ops.queries(layer, normed, rot)  # (B, N, Hq, D)
        mask = layout.mask(q_positions, window, last=last, key="all")
        context = attend(ops, layer, q.transpose(1, 2), keys, values, mask, training)
        return ops.after_attention(layer, hidden, context)
    # packed: queries of the active tokens only, laid out per row in slots
    x = normed[active]  # (n, H), row by row, positions in order
    r = None if rot is None else (rot[0][active], rot[1][active])
    q_packed = ops.queries(layer, x, r)  # (n, Hq, D)
    counts = active.sum(1)
    slots = torch.arange(int(counts.max()), device=hidden.device) < counts.unsqueeze(1)  # (B, Ta)
    q = q_packed.new_zeros(B, slots.shape[1], *q_packed.shape[1:])
    q[slots] = q_packed
    slot_pos = torch.zeros(slots.shape, dtype=q_positions.dtype, device=q_positions.device)
    slot_pos[slots] = q_positions[active]
    mask = layout.mask(slot_pos, window, last=False)
    if mask is None:
        mask = torch.ones(B, 1, *slots.shape[1:], layout.positions.shape[1], dtype=torch.bool, device=hidden.device)
    mask = mask | (~slots)[:, None, :, None] & layout.valid[:, None, None, :]  # empty slots: any real key (no NaN)
    context = attend(ops, layer, q.transpose(1, 2), keys, values, mask, training)[slots]  # (n, Hq * D)
    out = ops.after_attention(layer, hidden[active], context)
    return hidden.index_put((active,), out.to(hidden.dtype))  # out of place: gradients flow to both


def token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions of the real tokens (0, 1, ... from each row's first real token, left or right padding);
    padding gets 0."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def forward_with_exits(backbone: LayerwiseBackbone, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       token_exit: torch.Tensor, return_layers: bool = False
                       ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """The differentiable, cache-free form of the decoding loop's layer step (teacher forcing).

    input_ids, attention_mask: (B, T) (left or right padding); token_exit: (B, T) exit layer of every token in
    0..L (L = no exit). Every position runs at once, layer by layer: a token is updated by layers 1..e and keeps
    its state above e, and later tokens attend to keys and values of that copied state. Gradients flow when
    enabled (the backbone's train/eval mode sets dropout).

    Returns (B, T, H): each position's final state (its state at its exit layer; read it with
    ``backbone.lm_logits``); with ``return_layers`` also the list of every layer's (B, T, H) states 0..L.
    Equals, position by position, the states the decoding loop computes for the same tokens and exits.
    """
    ops = decoder_ops(backbone)
    valid = attention_mask.bool()
    positions = token_positions(attention_mask)
    hidden = ops.embed(input_ids, positions)
    rotary: Rotary = ops.rotary(hidden, positions)
    layout = KeyLayout.of(positions, valid)
    token_exit = token_exit.to(hidden.device)
    training = backbone.model.training
    layers = [hidden] if return_layers else []
    for layer in range(1, ops.num_layers + 1):
        active = valid & (token_exit >= layer)
        if not bool(active.any()):
            if return_layers:
                layers.extend([hidden] * (ops.num_layers - layer + 1))
            break
        normed = ops.attn_norm(layer, hidden)
        rot = ops.layer_rotary(rotary, layer)
        keys, values = ops.keys_values(layer, normed, rot)
        hidden = update_active(ops, layer, hidden, normed, active, rot, positions, keys, values, layout,
                               training=training)
        if return_layers:
            layers.append(hidden)
    return (hidden, layers) if return_layers else hidden
