"""Retrieval keys for RAEE: what a training or test example is looked up by.

- :class:`BackboneKeys` pools the backbone's own hidden state at an early layer that the
  forward pass computes anyway (layer 0 = embeddings), so retrieval costs no extra model call.
  Pooling: ``mean`` over every token of the (prompted) input, ``text`` over the text's own tokens only
  (a prompt template's tokens and special tokens left out), ``last`` the last real token, ``cls`` the first,
  or ``auto``: the one of :data:`AUTO_POOLINGS` whose keys' neighbours vote best on the validation split
  (:mod:`raee.key_choice`, done by the retrieval strategy's fit before the database is built).
- :class:`SentenceEncoderKeys` runs a separate sentence-embedding model over the text (the
  paper's released scripts use one); its time is counted as retrieval overhead, its FLOPs as keys' cost.

Both count their own compute (:meth:`KeyEncoder.flops`) in FLOPs per example, which :mod:`raee.cost`
turns into backbone layer equivalents.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from raee.backbones.base import LayerState
from raee.errors import UserError
from raee.heads.pooling import POOLINGS, pool

#: the poolings ``pooling=auto`` chooses from, in the order ties are broken
AUTO_POOLINGS = ("last", "text", "mean")


class KeyEncoder(ABC):
    #: the backbone layer whose state the keys need (planning happens after it)
    plan_layer: int = 0
    normalize: bool = True

    @abstractmethod
    def encode(self, state: LayerState, texts: list[str]) -> torch.Tensor:
        """(B, D) float32 keys for the batch; ``state`` is the backbone at :attr:`plan_layer`."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Identifies the key space (stored in database metadata; must match at inference)."""

    def bind(self, backbone: Any, head: Any) -> None:
        """One-time setup with the backbone and head the keys are taken for (a prompt's text span)."""

    def flops(self, texts: list[str]) -> torch.Tensor:
        """(B,) FLOPs the keys of ``texts`` cost beyond the backbone's layers (0: keys from those layers)."""
        return torch.zeros(len(texts), dtype=torch.float64)

    def _finish(self, keys: torch.Tensor) -> torch.Tensor:
        keys = keys.float()
        return torch.nn.functional.normalize(keys, dim=-1) if self.normalize else keys


class BackboneKeys(KeyEncoder):
    def __init__(self, layer: int = 0, pooling: str = "mean", normalize: bool = True) -> None:
        if pooling not in (*POOLINGS, "text", "auto"):
            raise UserError(f"key_encoder.pooling={pooling!r} is unknown: use one of {[*POOLINGS, 'text', 'auto']}")
        self.plan_layer = int(layer)
        self.pooling = pooling
        self.normalize = bool(normalize)
        self.margins: tuple[int, int] | None = None  # tokens before / after the text (pooling=text), set by bind()

    def bind(self, backbone: Any, head: Any) -> None:
        self.margins = text_margins(backbone, head)

    def encode(self, state: LayerState, texts: list[str]) -> torch.Tensor:
        if state.layer != self.plan_layer:
            raise ValueError(f"backbone keys are taken at layer {self.plan_layer}, got a state of layer {state.layer}")
        return self._finish(self.pool(state, self.pooling))

    def pool(self, state: LayerState, pooling: str) -> torch.Tensor:
        """(B, H) the state pooled by ``pooling`` (any of :data:`AUTO_POOLINGS` and ``cls``), not normalised."""
        if pooling == "auto":
            raise UserError("key_encoder.pooling=auto is chosen on the validation split by the retrieval strategy's "
                            "fit (exit=raee, raee_dynamic, raee_choice or knn); choose one of "
                            f"{list(AUTO_POOLINGS)} to use these keys on their own")
        if pooling != "text":
            return pool(state.hidden, state.attention_mask, pooling)
        if self.margins is None:
            raise RuntimeError("key_encoder.pooling=text needs the prompt's layout: call bind(backbone, head) first")
        return pool(state.hidden, text_mask(state.attention_mask, *self.margins), "mean")

    def describe(self) -> dict[str, Any]:
        return {"type": "backbone", "layer": self.plan_layer, "pooling": self.pooling, "normalize": self.normalize}


class SentenceEncoderKeys(KeyEncoder):
    """A separate encoder (default: the offline all-MiniLM-L6-v2), mean-pooled last layer."""

    plan_layer = 0

    def __init__(self, name_or_path: str = "sentence-transformers/all-MiniLM-L6-v2", pooling: str = "mean",
                 max_length: int = 128, normalize: bool = True, device: str = "cpu") -> None:
        from raee.backbones.loading import load_backbone

        self.name_or_path = name_or_path
        self.pooling = pooling
        self.normalize = bool(normalize)
        self.encoder = load_backbone(name_or_path, lm_head=False, max_length=max_length, device=device)

    @torch.no_grad()
    def encode(self, state: LayerState, texts: list[str]) -> torch.Tensor:
        enc = {k: v.to(self.encoder.device) for k, v in self.encoder.tokenize(texts).items()}
        out = self.encoder.model(**enc).last_hidden_state
        return self._finish(pool(out, enc["attention_mask"], self.pooling)).to(state.hidden.device)

    def flops(self, texts: list[str]) -> torch.Tensor:
        """Every layer of the encoder on each text's own tokens (counted outside any timed region)."""
        from raee.cost import layer_flops

        tokens = self.encoder.tokenize(texts)["attention_mask"].sum(1)
        return self.encoder.num_layers * layer_flops(self.encoder.config, tokens)

    def describe(self) -> dict[str, Any]:
        return {"type": "sentence_encoder", "name": self.name_or_path, "pooling": self.pooling,
                "normalize": self.normalize}


def text_margins(backbone: Any, head: Any) -> tuple[int, int]:
    """(tokens before the text, tokens after it) in the backbone's input: the head's prompt template
    (:meth:`~raee.heads.prompt.PromptHead.text_margins`) or, for a head without one, the special tokens the
    tokenizer adds around a text."""
    own = getattr(head, "text_margins", None)
    if callable(own):
        return own(backbone)
    tok = backbone.tokenizer
    plain = tok("a b", add_special_tokens=False)["input_ids"]
    full = tok("a b")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return start, len(full) - start - len(plain)
    return 0, 0


def text_mask(attention_mask: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """(B, T) mask of the text's tokens: the real tokens less ``before`` at the start and ``after`` at the end
    (right padding). An example whose text span would be empty keeps all its real tokens."""
    lengths = attention_mask.sum(1, keepdim=True)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device).unsqueeze(0)
    span = (positions >= before) & (positions < lengths - after)
    span = span & attention_mask.bool()
    empty = ~span.any(1, keepdim=True)
    return torch.where(empty, attention_mask.bool(), span).to(attention_mask.dtype)
