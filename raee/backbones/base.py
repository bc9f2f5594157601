"""The layer-by-layer backbone interface that every exit strategy steps through.

Layer 0 is the embedding output; layer l in 1..L is the output of transformer layer l.
A :class:`LayerState` carries the hidden states of the examples still in the batch; the
exit loop drops exited examples with :meth:`LayerwiseBackbone.select`, so the layers after
an example's exit are never computed for it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from raee.backbones.lm_head import LMHeadRows
from raee.errors import UserError


@dataclass
class LayerState:
    """Hidden states of the examples still running.

    hidden:         (B, T, H) output of layer ``layer``
    attention_mask: (B, T) 1 for real tokens, 0 for padding
    input_ids:      (B, T) token ids (heads need them, e.g. to find the mask token)
    layer:          index of the last layer computed (0 = embeddings)
    extras:         family-specific tensors derived from the above (4-D masks, rotary tables);
                    rebuilt by the backbone after every selection
    """

    hidden: torch.Tensor
    attention_mask: torch.Tensor
    input_ids: torch.Tensor
    layer: int
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]


class LayerwiseBackbone(nn.Module, ABC):
    """A Hugging Face transformer exposed one layer at a time.

    Subclasses implement :meth:`_embed`, :meth:`_run_layer` and :meth:`_prepare`; everything
    else (tokenisation, selection, counting layer calls, the full pass) is shared.
    """

    #: True for causal decoders: the sequence summary is the last real token, not the first
    is_decoder: bool = False

    def __init__(self, model: nn.Module, tokenizer: Any, *, name: str, max_length: int = 128,
                 lm_head: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.max_length = max_length
        self.lm_head = lm_head
        #: on how many examples each layer 1..L ran (tests and reports read it)
        self.layer_examples = [0] * (self.num_layers + 1)
        self.model.eval()

    # ----------------------------------------------------------------- description
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def num_layers(self) -> int:
        # read once: a transformers config's attribute lookup costs ~50 us, and the exit loop asks every layer
        if getattr(self, "_num_layers", None) is None:
            cfg = self.model.config
            self._num_layers = int(cfg.num_hidden_layers if hasattr(cfg, "num_hidden_layers") else cfg.n_layer)
        return self._num_layers

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "dim", None) or cfg.n_embd)

    @property
    def has_lm_head(self) -> bool:
        return self.lm_head is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model_type": self.model.config.model_type,
                "num_layers": self.num_layers, "hidden_size": self.hidden_size,
                "has_lm_head": self.has_lm_head}

    def reset_counters(self) -> None:
        self.layer_examples = [0] * (self.num_layers + 1)

    # ----------------------------------------------------------------- tokenisation
    def tokenize(self, texts: list[str], text_pairs: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Tokenise a batch, padded to its longest member (never to a fixed 512)."""
        enc = self.tokenizer(texts, text_pairs, padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        keys = ("input_ids", "attention_mask") if self.is_decoder else ("input_ids", "attention_mask", "token_type_ids")
        return {k: v for k, v in enc.items() if k in keys}

    # ----------------------------------------------------------------- layer stepping
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor | None = None) -> LayerState:
        """Run the embedding layer: the returned state is layer 0."""
        hidden = self._embed(input_ids, token_type_ids)
        state = LayerState(hidden=hidden, attention_mask=attention_mask, input_ids=input_ids, layer=0)
        self._prepare(state)
        return state

    def run_layer(self, state: LayerState,
                  compute: Callable[[int, LayerState], torch.Tensor] | None = None) -> LayerState:
        """Run transformer layer ``state.layer + 1`` on the examples in ``state``.

        compute: another way to compute the layer's hidden states from (layer, state), e.g.
        HashEE's token-level layer; default: the model's own layer.
        """
        layer = state.layer + 1
        if layer > self.num_layers:
            raise ValueError(f"cannot run layer {layer}: the backbone has {self.num_layers} layers")
        self.layer_examples[layer] += state.batch_size
        hidden = (compute or self._run_layer)(layer, state)
        return LayerState(hidden=hidden, attention_mask=state.attention_mask, input_ids=state.input_ids,
                          layer=layer, extras=state.extras)

    def select(self, state: LayerState, keep: torch.Tensor) -> LayerState:
        """Keep only the examples where ``keep`` (B,) is True, trimming padding no one needs.

        Trailing padding columns are dropped: with right padding and absolute positions
        already embedded, no real token attends to them, so the result is exact.
        """
        mask = state.attention_mask[keep]
        length = int(mask.sum(dim=1).max().item()) if mask.shape[0] else 0
        new = LayerState(hidden=state.hidden[keep][:, :length], attention_mask=mask[:, :length],
                         input_ids=state.input_ids[keep][:, :length], layer=state.layer)
        self._prepare(new)
        return new

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """Norm applied after the last layer (decoders); identity for post-norm encoders."""
        return hidden

    def lm_logits(self, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the model's own LM head (after :meth:`final_norm`). hidden: (N, H) -> (N, V), or
        (N, len(token_ids)) when ``token_ids`` are given: only those vocabulary rows are computed
        (a prompt head's label words), never the whole vocabulary."""
        if self.lm_head is None:
            raise UserError(
                f"backbone '{self.name}' has no language-model head (the checkpoint has no MLM/LM weights); "
                "the prompt head needs one: use head=prototype or head=linear, or a checkpoint with an LM head")
        rows = self.__dict__.get("_lm_rows")
        if rows is None or rows[0] is not self.lm_head:  # split once per head module
            rows = (self.lm_head, LMHeadRows(self.lm_head))
            self.__dict__["_lm_rows"] = rows
        return rows[1](self.final_norm(hidden), token_ids)  # families that post-process logits override this

    def all_layers(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   token_type_ids: torch.Tensor | None = None) -> list[LayerState]:
        """Every layer's state 0..L, no exits (database building, head fitting). Keeps grads if enabled."""
        state = self.embed(input_ids, attention_mask, token_type_ids)
        states = [state]
        for _ in range(self.num_layers):
            state = self.run_layer(state)
            states.append(state)
        return states

    # ----------------------------------------------------------------- family hooks
    @abstractmethod
    def _embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """(B, T) ids -> (B, T, H) layer-0 hidden states."""

    @abstractmethod
    def _prepare(self, state: LayerState) -> None:
        """Fill ``state.extras`` with what the layers need (attention masks, positions)."""

    @abstractmethod
    def _run_layer(self, layer: int, state: LayerState) -> torch.Tensor:
        """Run transformer layer ``layer`` (1-based) and return the new (B, T, H) hidden states."""

    @abstractmethod
    def layer_modules(self) -> nn.ModuleList:
        """The L transformer layers, in order."""
