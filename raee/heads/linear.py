"""Internal classifiers: one linear layer per exit layer on the pooled hidden state.

These are the off-ramps of DeeBERT/PABEE-style baselines. They are trained with Lightning
(:mod:`raee.training`) on the frozen backbone (DeeBERT's second stage) or jointly with it
(PABEE's weighted loss, ``finetune_backbone=True``), saved as safetensors and reloaded by path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from raee.atomic import atomic_path, atomic_write_text
from raee.backbones.base import LayerState, LayerwiseBackbone
from raee.errors import MissingFileError, UserError
from raee.heads.base import Head
from raee.heads.pooling import pool


class LinearHead(Head):
    """One ``nn.Linear`` per layer 0..L on the pooled hidden state: class logits (B, C), or one real
    value (B, 1) per example for regression (trained with MSE).

    lr: classifier learning rate; max_epochs: training epochs; finetune_backbone: train the backbone
    too (PABEE's joint training, with ``backbone_lr``, linear warm-up over ``warmup`` of the steps then
    linear decay, ``weight_decay`` and gradient clipping); seed: classifier initialisation, dropout and
    batch order of the fit. Every training setting is part of :meth:`describe`, so caches keyed on it
    (fitted heads, RAEE databases) change when any of them does.
    """

    needs_fit = True
    supports_regression = True

    def __init__(self, pooling: str = "mean", dropout: float = 0.1, lr: float = 1e-3, max_epochs: int = 3,
                 finetune_backbone: bool = False, backbone_lr: float = 2e-5, loss_weighting: str | None = None,
                 warmup: float = 0.1, weight_decay: float = 0.01, gradient_clip_val: float | None = 1.0,
                 seed: int = 42, checkpoint: str | None = None) -> None:
        super().__init__()
        if loss_weighting not in (None, "sum", "pabee"):
            raise UserError(f"head.loss_weighting must be sum (DeeBERT) or pabee (weighted average), not {loss_weighting}")
        if not 0.0 <= warmup < 1.0:
            raise UserError(f"head.warmup={warmup} is the warm-up share of the training steps: give 0 <= warmup < 1")
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.lr, self.max_epochs, self.backbone_lr = float(lr), int(max_epochs), float(backbone_lr)
        self.warmup, self.weight_decay = float(warmup), float(weight_decay)
        self.gradient_clip_val = gradient_clip_val
        self.seed = int(seed)
        self.finetune_backbone = bool(finetune_backbone)
        # DeeBERT sums the off-ramp losses on a frozen backbone; PABEE weights layer j by j when fine-tuning
        self.loss_weighting = loss_weighting or ("pabee" if finetune_backbone else "sum")
        self.checkpoint = checkpoint
        self.classifiers = nn.ModuleList()
        self.train_steps = 0  # optimiser steps of the last fit (read back from a saved head)

    def bind(self, backbone: LayerwiseBackbone, label_names: list[str]) -> None:
        super().bind(backbone, label_names)
        self.classifiers = nn.ModuleList(
            nn.Linear(backbone.hidden_size, self.num_classes) for _ in range(backbone.num_layers + 1)
        ).to(backbone.device)

    def reset_classifiers(self) -> None:
        """Fresh classifier weights from torch's generator (the fit seeds it with ``seed`` first)."""
        for classifier in self.classifiers:
            classifier.reset_parameters()

    def forward(self, state: LayerState) -> torch.Tensor:
        return self.classifiers[state.layer](self.dropout(pool(state.hidden, state.attention_mask, self.pooling)))

    def layer_weights(self) -> torch.Tensor:
        """(L+1,) loss weight per layer: 1 each (sum), or PABEE's j / sum_j j (layer 0 weighted like layer 1)."""
        L = len(self.classifiers) - 1
        if self.loss_weighting == "sum":
            return torch.ones(L + 1)
        w = torch.arange(L + 1, dtype=torch.float32).clamp(min=1.0)
        return w / w.sum()

    def fit(self, backbone: LayerwiseBackbone, datamodule: Any, progress: bool = True, **trainer_kwargs: Any) -> None:
        from raee.training import train_linear_head

        self.train_steps = train_linear_head(backbone, self, datamodule, progress=progress, **trainer_kwargs)

    def save(self, directory: str | Path, backbone: LayerwiseBackbone | None = None) -> None:
        """Write classifiers (and, when fine-tuned, the backbone weights) as safetensors."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / "classifiers.safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.classifiers.state_dict().items()}, str(tmp))
        if self.finetune_backbone and backbone is not None:
            with atomic_path(directory / "backbone.safetensors") as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}, str(tmp))
        meta = self.describe() | {"label_names": self.label_names, "num_layers": len(self.classifiers) - 1,
                                  "backbone": backbone.name if backbone is not None else None,
                                  "train_steps": self.train_steps}
        atomic_write_text(directory / "head.json", json.dumps(meta, indent=2))

    def load(self, directory: str | Path, backbone: LayerwiseBackbone | None = None) -> None:
        directory = Path(directory)
        meta_path = directory / "head.json"
        if not meta_path.exists():
            raise MissingFileError(f"no linear head checkpoint at {directory} (head.json missing): "
                                   "train one first (it is saved where head.checkpoint points)")
        meta = json.loads(meta_path.read_text())
        if meta["label_names"] != self.label_names or meta["num_layers"] != len(self.classifiers) - 1:
            raise UserError(f"checkpoint {directory} was trained for classes {meta['label_names']} and "
                            f"{meta['num_layers']} layers, not {self.label_names} and {len(self.classifiers) - 1}")
        classifiers = load_file(str(directory / "classifiers.safetensors"))
        backbone_file = directory / "backbone.safetensors"
        weights = load_file(str(backbone_file)) if backbone_file.exists() and backbone is not None else None
        self.classifiers.load_state_dict(classifiers)  # read everything first: a broken save changes nothing
        if weights is not None:
            backbone.model.load_state_dict(weights)
        self.train_steps = int(meta.get("train_steps", 0))

    def describe(self) -> dict[str, Any]:
        out = {"type": "linear", "pooling": self.pooling, "finetune_backbone": self.finetune_backbone,
               "loss_weighting": self.loss_weighting, "task": "regression" if self.regression else "classification",
               "dropout": self.dropout.p, "lr": self.lr, "max_epochs": self.max_epochs, "seed": self.seed}
        if self.finetune_backbone:  # settings that only the joint fine-tune reads
            out |= {"backbone_lr": self.backbone_lr, "warmup": self.warmup, "weight_decay": self.weight_decay,
                    "gradient_clip_val": self.gradient_clip_val}
        return out

    def budget(self) -> dict[str, Any] | None:
        """The backbone fine-tuning budget (PABEE joint training); None when the backbone stays frozen."""
        if not self.finetune_backbone:
            return None
        return {"by": "head", "epochs": self.max_epochs, "steps": self.train_steps, "lr": self.backbone_lr,
                "head_lr": self.lr, "warmup": self.warmup, "weight_decay": self.weight_decay, "seed": self.seed}
