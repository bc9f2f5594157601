"""Bidirectional encoders: BERT, RoBERTa, XLM-R, ELECTRA, MiniLM (BertModel) and DistilBERT."""

from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from raee.backbones.base import LayerState, LayerwiseBackbone


class EncoderBackbone(LayerwiseBackbone):
    """Encoder whose layers sit in ``model.encoder.layer`` (BERT family) or
    ``model.transformer.layer`` (DistilBERT). Mirrors the loop of ``modeling_bert.py``."""

    def layer_modules(self) -> nn.ModuleList:
        if hasattr(self.model, "encoder"):
            return self.model.encoder.layer
        return self.model.transformer.layer

    def _embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        if self.model.config.model_type == "distilbert":
            return self.model.embeddings(input_ids=input_ids)
        return self.model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    def _prepare(self, state: LayerState) -> None:
        # transformers >= 5: the mask format depends on the attention implementation (sdpa/eager)
        state.extras["mask"] = create_bidirectional_mask(
            config=self.model.config, inputs_embeds=state.hidden, attention_mask=state.attention_mask)

    def _run_layer(self, layer: int, state: LayerState) -> torch.Tensor:
        module = self.layer_modules()[layer - 1]
        # transformers >= 5: a layer returns a Tensor, not a tuple
        out = module(state.hidden, attention_mask=state.extras["mask"])
        return out[0] if isinstance(out, tuple) else out
