"""A model's LM head split into (transform, vocabulary projection), so that a prompt head can
score only the rows of the vocabulary it needs (its label words).

Every LM head we load ends in one ``nn.Linear`` over the vocabulary; what comes before it differs:

- causal decoders (GPT-2, Llama, Gemma, ...): the projection alone (the final norm is the backbone's);
- BERT (``cls``): ``predictions.transform`` (dense + activation + LayerNorm), then ``predictions.decoder``;
- RoBERTa / XLM-R / CamemBERT (``lm_head``): dense + GELU + layer_norm, then ``decoder``;
- DistilBERT / ELECTRA: an ``nn.Sequential`` whose last module is the projection.

Scoring C label words costs C x H multiply-adds per position instead of V x H (V = 49,152 for
SmolLM2, 262,144 for Gemma-3).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from raee.errors import UserError


class LMHeadRows:
    """Logits of a model's LM head, for the whole vocabulary or for chosen token ids only.

    Holds references to the head's modules (not copies), so moving the model moves it too.
    """

    def __init__(self, lm_head: nn.Module) -> None:
        self.transform, self.projection = split_lm_head(lm_head)

    @property
    def vocab_size(self) -> int:
        return int(self.projection.weight.shape[0])

    def __call__(self, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (N, H) -> logits (N, V), or (N, len(token_ids)) at the rows ``token_ids`` (in that order)."""
        x = self.transform(hidden) if self.transform is not None else hidden
        if token_ids is None:
            return self.projection(x)
        ids = token_ids.to(self.projection.weight.device)
        bias = self.projection.bias
        return F.linear(x, self.projection.weight[ids], None if bias is None else bias[ids])


def split_lm_head(lm_head: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, nn.Linear]:
    """(transform applied before the vocabulary projection, or None; the projection ``nn.Linear``)."""
    if isinstance(lm_head, nn.Linear):
        return None, lm_head
    if isinstance(lm_head, nn.Sequential) and isinstance(lm_head[-1], nn.Linear):  # DistilBERT, ELECTRA
        return nn.Sequential(*list(lm_head)[:-1]), lm_head[-1]
    predictions = getattr(lm_head, "predictions", None)
    if predictions is not None and isinstance(getattr(predictions, "decoder", None), nn.Linear):  # BERT
        return predictions.transform, predictions.decoder
    if all(isinstance(getattr(lm_head, n, None), nn.Module) for n in ("dense", "layer_norm")) and isinstance(
            getattr(lm_head, "decoder", None), nn.Linear):  # RoBERTa, XLM-R, CamemBERT
        def transform(x: torch.Tensor) -> torch.Tensor:
            return lm_head.layer_norm(F.gelu(lm_head.dense(x)))

        return transform, lm_head.decoder
    raise UserError(
        f"cannot split the LM head {type(lm_head).__name__} into a transform and a vocabulary projection: "
        "add its layout to raee/backbones/lm_head.py::split_lm_head (the prompt head scores only the label "
        "words' rows of the projection)")
