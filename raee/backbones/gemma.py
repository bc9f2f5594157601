"""Gemma-2 and Gemma-3 decoders: sliding-window and global attention layers, one mask per kind.

What differs from Llama (and is all taken from the Hugging Face modules, not re-implemented):

- ``config.layer_types`` names each layer ``sliding_attention`` (a local window of
  ``config.sliding_window`` tokens) or ``full_attention``; each kind gets its own 4-D mask;
- Gemma-3 keeps one rotary table per layer kind (local rope base 10k, global 1M);
  Gemma-2 one table for all;
- the embedding module multiplies by sqrt(hidden_size) itself (``Gemma*TextScaledWordEmbedding``);
- the extra norms (post-attention, pre/post-feed-forward, q/k norms) live inside the HF layer;
- the LM head is tied to the embeddings and its logits may be soft-capped
  (``config.final_logit_softcapping``: Gemma-2 sets 30, Gemma-3 none): :meth:`softcap_logits`.

Bidirectional variants (EmbeddingGemma, ``use_bidirectional_attention``) are encoders and refused.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from raee.backbones.base import LayerState, LayerwiseBackbone
from raee.errors import UserError


class GemmaBackbone(LayerwiseBackbone):
    """Gemma-2 (``gemma2``) and Gemma-3 (``gemma3_text``; the text part of ``gemma3``)."""

    is_decoder = True

    def __init__(self, model: nn.Module, tokenizer, **kwargs) -> None:
        if getattr(model.config, "use_bidirectional_attention", False):
            raise UserError(
                f"{type(model).__name__} uses bidirectional attention (an embedding model such as EmbeddingGemma), "
                "not a causal decoder: use a causal Gemma checkpoint, or an encoder backbone")
        super().__init__(model, tokenizer, **kwargs)
        self.layer_types: list[str] = list(model.config.layer_types)

    def layer_modules(self) -> nn.ModuleList:
        return self.model.layers

    def _embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)  # scales by sqrt(hidden_size) inside

    def _prepare(self, state: LayerState) -> None:
        position_ids = torch.arange(state.hidden.shape[1], device=state.hidden.device).unsqueeze(0)
        args = dict(config=self.model.config, inputs_embeds=state.hidden, attention_mask=state.attention_mask,
                    past_key_values=None, position_ids=position_ids)
        state.extras["position_ids"] = position_ids
        state.extras["masks"] = {"full_attention": create_causal_mask(**args),
                                 "sliding_attention": create_sliding_window_causal_mask(**args)}
        rotary = self.model.rotary_emb
        if hasattr(rotary, "layer_types"):  # Gemma-3: one table per layer kind
            state.extras["rotary"] = {kind: rotary(state.hidden, position_ids, kind) for kind in set(self.layer_types)}
        else:  # Gemma-2: one table for every layer
            table = rotary(state.hidden, position_ids)
            state.extras["rotary"] = {kind: table for kind in set(self.layer_types)}

    def _run_layer(self, layer: int, state: LayerState) -> torch.Tensor:
        kind = self.layer_types[layer - 1]
        out = self.model.layers[layer - 1](
            state.hidden, position_embeddings=state.extras["rotary"][kind], attention_mask=state.extras["masks"][kind],
            position_ids=state.extras["position_ids"], past_key_values=None, use_cache=False)
        return out[0] if isinstance(out, tuple) else out

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.norm(hidden)

    def softcap_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``cap * tanh(logits / cap)`` when the config sets ``final_logit_softcapping``, else unchanged.

        Element-wise, so it commutes with picking vocabulary rows: apply it to any LM-head logits.
        """
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def lm_logits(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The shared LM-head path (final norm, tied head), then Gemma's logit soft-capping."""
        return self.softcap_logits(super().lm_logits(hidden, *args, **kwargs))
