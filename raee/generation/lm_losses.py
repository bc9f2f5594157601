"""Language-model losses on the target tokens of (prompt, target) sequences, at one layer or at all.

A training sequence is ``prompt + target`` (right-padded in a batch); ``target_mask`` (B, T) marks the
target tokens. The token at position t is predicted from the hidden state at t - 1, so the loss reads
the states one position before each target token, and only those: the LM head (V rows: 49,152 for
SmolLM2) is applied to the few target positions, never to the whole prompt.

- :func:`last_layer_loss`: the ordinary fine-tuning loss, at layer L.
- :func:`joint_loss`: CALM's (Schuster et al. 2022) weighted average of every layer's loss, each layer read
  through the model's own final norm and LM head, layer l weighted by l (deeper layers weigh more), so
  that every layer's read-out is a usable next-token predictor (confidence exits, self-speculative drafts).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

from raee.backbones.base import LayerwiseBackbone


def prediction_positions(target_mask: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the target tokens are predicted from, and what they are.

    target_mask: (B, T) bool, True at target tokens; input_ids: (B, T).
    Returns (positions (N, 2) of (row, column) of the states that predict them, labels (N,)): a target token
    at column t is predicted by the state at column t - 1. A target at column 0 has no predictor and is
    skipped (a sequence always starts with its prompt).
    """
    target = target_mask.bool().clone()
    target[:, 0] = False
    rows, cols = target.nonzero(as_tuple=True)
    return torch.stack([rows, cols - 1], dim=1), input_ids[rows, cols]


def layer_loss(backbone: LayerwiseBackbone, hidden: torch.Tensor, positions: torch.Tensor,
               labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the next-token predictions read from ``hidden`` (B, T, H) at ``positions`` (N, 2)
    through the backbone's final norm and LM head, against ``labels`` (N,)."""
    states = hidden[positions[:, 0], positions[:, 1]]  # (N, H)
    logits = backbone.lm_logits(states)  # (N, V)
    return F.cross_entropy(logits.float(), labels)


def last_layer_loss(backbone: LayerwiseBackbone, hidden: torch.Tensor, target_mask: torch.Tensor,
                    input_ids: torch.Tensor) -> torch.Tensor:
    """The plain fine-tuning loss: cross-entropy of the target tokens at layer L. hidden: (B, T, H) of layer L."""
    positions, labels = prediction_positions(target_mask, input_ids)
    return layer_loss(backbone, hidden, positions, labels)


def calm_weights(num_layers: int) -> torch.Tensor:
    """(L,) CALM's layer weights for layers 1..L: w_l = l / sum_j j (they sum to 1; layer L weighs most)."""
    w = torch.arange(1, num_layers + 1, dtype=torch.float32)
    return w / w.sum()


def joint_loss(backbone: LayerwiseBackbone, hiddens: Sequence[torch.Tensor], target_mask: torch.Tensor,
               input_ids: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CALM's joint loss: sum_l w_l * loss_l over layers 1..L (``hiddens``: L tensors (B, T, H), layer 1 first).

    weights: (L,) (default :func:`calm_weights`). Returns (the weighted loss, (L,) per-layer losses detached).
    """
    if weights is None:
        weights = calm_weights(len(hiddens))
    if len(weights) != len(hiddens):
        raise ValueError(f"{len(weights)} layer weights for {len(hiddens)} layers")
    positions, labels = prediction_positions(target_mask, input_ids)
    losses = torch.stack([layer_loss(backbone, h, positions, labels) for h in hiddens])
    return (losses * weights.to(losses.device)).sum(), losses.detach()
