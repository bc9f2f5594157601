"""Turn data-module batches into backbone inputs, and run every layer over a split.

Shared by head fitting (prototypes, linear heads) and the RAEE database build, which all
need each layer's hidden states of the training examples.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from raee.backbones.base import LayerState, LayerwiseBackbone


def encode_batch(backbone: LayerwiseBackbone, head: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Format (prompt templates) and tokenise a batch; tensors land on the backbone's device."""
    texts, pairs = head.format(list(batch["text"]), batch.get("text_pair"), backbone)
    enc = backbone.tokenize(texts, pairs)
    return {k: v.to(backbone.device) for k, v in enc.items()}


def iterate_all_layers(backbone: LayerwiseBackbone, head: Any, batches: Iterable[dict[str, Any]],
                       desc: str = "layers", progress: bool = True
                       ) -> Iterator[tuple[list[LayerState], dict[str, Any]]]:
    """Yield (states of layers 0..L, batch) for every batch, without holding more than one batch."""
    total = len(batches) if hasattr(batches, "__len__") else None
    for batch in tqdm(batches, desc=desc, total=total, disable=not progress, leave=False):
        enc = encode_batch(backbone, head, batch)
        with torch.no_grad():
            states = backbone.all_layers(**enc)
        yield states, batch


def run_to_layer(backbone: LayerwiseBackbone, inputs: dict[str, torch.Tensor], layer: int) -> LayerState:
    """The state of layer ``layer`` (0 = embeddings) of a tokenised batch, computing no layer beyond it."""
    with torch.no_grad():
        state = backbone.embed(**inputs)
        for _ in range(layer):
            state = backbone.run_layer(state)
    return state


def iterate_to_layer(backbone: LayerwiseBackbone, head: Any, batches: Iterable[dict[str, Any]], layer: int,
                     desc: str = "layers", progress: bool = True) -> Iterator[tuple[LayerState, dict[str, Any]]]:
    """Yield (state of layer ``layer``, batch) for every batch: keys need only the layers up to theirs."""
    total = len(batches) if hasattr(batches, "__len__") else None
    for batch in tqdm(batches, desc=desc, total=total, disable=not progress, leave=False):
        yield run_to_layer(backbone, encode_batch(backbone, head, batch), layer), batch
