"""Training-free class prototypes per layer: cosine similarity to each class's mean vector."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from raee.atomic import atomic_write_text, atomic_path
from raee.backbones.base import LayerState, LayerwiseBackbone
from raee.errors import UserError
from raee.features import iterate_all_layers
from raee.heads.base import Head
from raee.heads.pooling import pool


class PrototypeHead(Head):
    """logits[c] = scale * cos(pool(h_l) - mu_l, prototype[l, c]); prototypes are the mean pooled
    hidden state of each class's training examples at layer l, minus mu_l (no gradient training).

    center: subtract the training mean mu_l of each layer first. Raw pooled states of all
    classes point in nearly the same direction (cosines 0.87-0.94 on MiniLM), which makes every
    layer's softmax almost flat; centring spreads them so confidences mean something.
    """

    needs_fit = True

    def __init__(self, pooling: str = "mean", scale: float = 10.0, center: bool = True) -> None:
        super().__init__()
        self.pooling = pooling
        self.scale = float(scale)
        self.center = bool(center)
        self.register_buffer("prototypes", torch.zeros(0))  # (L+1, C, H), L2-normalised
        self.register_buffer("centers", torch.zeros(0))  # (L+1, H) training mean per layer (zeros: no centring)

    @property
    def is_fitted(self) -> bool:
        return self.prototypes.numel() > 0

    @torch.no_grad()
    def fit(self, backbone: LayerwiseBackbone, datamodule: Any, progress: bool = True) -> None:
        """Average the pooled states of each class at every layer over the training split."""
        batches = datamodule.train_dataloader()
        L, C, H = backbone.num_layers, self.num_classes, backbone.hidden_size
        sums = torch.zeros(L + 1, C, H, dtype=torch.float64)
        counts = torch.zeros(C, dtype=torch.float64)
        for states, batch in iterate_all_layers(backbone, self, batches, desc="prototypes", progress=progress):
            labels = batch["label"].long().cpu()
            onehot = torch.nn.functional.one_hot(labels, C).to(torch.float64)  # (B, C)
            counts += onehot.sum(0)
            for state in states:
                pooled = pool(state.hidden, state.attention_mask, self.pooling).cpu().to(torch.float64)
                sums[state.layer] += onehot.T @ pooled
        if (counts == 0).any():
            empty = [self.label_names[i] for i in torch.nonzero(counts == 0).flatten().tolist()]
            raise UserError(f"no training examples for classes {empty}: prototypes need at least one per class")
        class_means = sums / counts.view(1, C, 1)  # (L+1, C, H)
        centers = (sums.sum(1) / counts.sum()) if self.center else torch.zeros(L + 1, H, dtype=torch.float64)
        protos = (class_means - centers.unsqueeze(1)).float()
        self.prototypes = torch.nn.functional.normalize(protos, dim=-1).to(backbone.device)
        self.centers = centers.float().to(backbone.device)

    def forward(self, state: LayerState) -> torch.Tensor:
        if not self.is_fitted:
            raise RuntimeError("prototype head is not fitted: call fit() on the training split or load() a saved one")
        pooled = pool(state.hidden, state.attention_mask, self.pooling) - self.centers[state.layer]
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return self.scale * pooled @ self.prototypes[state.layer].T

    def save(self, directory: str | Path, backbone: LayerwiseBackbone | None = None) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / "prototypes.safetensors") as tmp:
            save_file({"prototypes": self.prototypes.cpu().contiguous(), "centers": self.centers.cpu().contiguous()},
                      str(tmp))
        atomic_write_text(directory / "head.json", json.dumps(self.describe() | {"label_names": self.label_names}))

    def load(self, directory: str | Path, backbone: LayerwiseBackbone | None = None) -> None:
        directory = Path(directory)
        meta = json.loads((directory / "head.json").read_text())
        if meta["label_names"] != self.label_names:
            raise UserError(f"saved prototypes in {directory} are for classes {meta['label_names']}, "
                            f"not {self.label_names}: refit them")
        tensors = load_file(str(directory / "prototypes.safetensors"))
        protos = tensors["prototypes"]
        if protos.shape[0] != self.num_layers + 1:
            raise UserError(f"saved prototypes in {directory} have {protos.shape[0] - 1} layers, "
                            f"the backbone has {self.num_layers}: refit them")
        self.prototypes = protos.to(self.prototypes.device)
        self.centers = tensors["centers"].to(self.prototypes.device)

    def describe(self) -> dict[str, Any]:
        return {"type": "prototype", "pooling": self.pooling, "scale": self.scale, "center": self.center}
