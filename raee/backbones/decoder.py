"""Causal decoders: GPT-2 and the Llama family (Llama, Mistral, Qwen2/3).

Prediction for a sequence is read at its last real token, so the tokenizer pads on the right
and the exit loop trims trailing padding exactly as for encoders.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from raee.backbones.base import LayerState, LayerwiseBackbone


class _DecoderBackbone(LayerwiseBackbone):
    is_decoder = True

    def _positions(self, state: LayerState) -> torch.Tensor:
        return torch.arange(state.hidden.shape[1], device=state.hidden.device).unsqueeze(0)

    def _prepare(self, state: LayerState) -> None:
        position_ids = self._positions(state)
        state.extras["position_ids"] = position_ids
        state.extras["mask"] = create_causal_mask(
            config=self.model.config, inputs_embeds=state.hidden, attention_mask=state.attention_mask,
            past_key_values=None, position_ids=position_ids)


class GPT2Backbone(_DecoderBackbone):
    def layer_modules(self) -> nn.ModuleList:
        return self.model.h

    def _embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return self.model.drop(self.model.wte(input_ids) + self.model.wpe(positions))

    def _run_layer(self, layer: int, state: LayerState) -> torch.Tensor:
        out = self.model.h[layer - 1](state.hidden, None, state.extras["mask"],
                                      position_ids=state.extras["position_ids"], use_cache=False)
        return out[0] if isinstance(out, tuple) else out

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.ln_f(hidden)


class LlamaBackbone(_DecoderBackbone):
    def layer_modules(self) -> nn.ModuleList:
        return self.model.layers

    def _embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def _prepare(self, state: LayerState) -> None:
        super()._prepare(state)
        state.extras["rotary"] = self.model.rotary_emb(state.hidden, position_ids=state.extras["position_ids"])

    def _run_layer(self, layer: int, state: LayerState) -> torch.Tensor:
        out = self.model.layers[layer - 1](
            state.hidden, attention_mask=state.extras["mask"], position_embeddings=state.extras["rotary"],
            position_ids=state.extras["position_ids"], past_key_values=None, use_cache=False)
        return out[0] if isinstance(out, tuple) else out

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.norm(hidden)
