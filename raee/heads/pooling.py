"""Summarise a sequence of hidden states into one vector per example."""

from __future__ import annotations

import torch

from raee.errors import UserError

POOLINGS = ("mean", "cls", "last")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, H) hidden states, (B, T) mask -> (B, H).

    mean: average of real tokens (sentence-transformers style); cls: first token (BERT's [CLS]);
    last: last real token (causal decoders, right padding).
    """
    if how == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        last = attention_mask.sum(1).long().clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise UserError(f"unknown pooling '{how}': choose one of {POOLINGS}")
