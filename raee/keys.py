"""Retrieval keys for RAEE: what a training or test example is looked up by.

- :class:`BackboneKeys` pools the backbone's own hidden state at an early layer that the
  forward pass computes anyway (layer 0 = embeddings), so retrieval costs no extra model call.
- :class:`SentenceEncoderKeys` runs a separate sentence-embedding model over the text (the
  paper's released scripts use one); its time is counted as retrieval overhead.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from raee.backbones.base import LayerState
from raee.heads.pooling import pool


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

    def _finish(self, keys: torch.Tensor) -> torch.Tensor:
        keys = keys.float()
        return torch.nn.functional.normalize(keys, dim=-1) if self.normalize else keys


class BackboneKeys(KeyEncoder):
    def __init__(self, layer: int = 0, pooling: str = "mean", normalize: bool = True) -> None:
        self.plan_layer = int(layer)
        self.pooling = pooling
        self.normalize = bool(normalize)

    def encode(self, state: LayerState, texts: list[str]) -> torch.Tensor:
        if state.layer != self.plan_layer:
            raise ValueError(f"backbone keys are taken at layer {self.plan_layer}, got a state of layer {state.layer}")
        return self._finish(pool(state.hidden, state.attention_mask, self.pooling))

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

    def describe(self) -> dict[str, Any]:
        return {"type": "sentence_encoder", "name": self.name_or_path, "pooling": self.pooling,
                "normalize": self.normalize}
