"""Lightning training of internal classifiers (and optionally the backbone)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.nn import functional as F

from raee.backbones.base import LayerwiseBackbone
from raee.features import encode_batch
from raee.heads.linear import LinearHead


class LinearHeadTraining(L.LightningModule):
    """Trains every layer's classifier with the head's loss weighting (sum or PABEE)."""

    def __init__(self, backbone: LayerwiseBackbone, head: LinearHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.register_buffer("weights", head.layer_weights(), persistent=False)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        enc = encode_batch(self.backbone, self.head, batch)
        labels = batch["label"].long().to(self.device)
        with torch.set_grad_enabled(self.head.finetune_backbone):
            states = self.backbone.all_layers(**enc)
        losses = torch.stack([F.cross_entropy(self.head(s), labels) for s in states])
        loss = (losses * self.weights).sum()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        enc = encode_batch(self.backbone, self.head, batch)
        labels = batch["label"].long().to(self.device)
        states = self.backbone.all_layers(**enc)
        acc = (self.head(states[-1]).argmax(-1) == labels).float().mean()
        self.log("val/last_layer_acc", acc, prog_bar=True, batch_size=len(labels))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = [{"params": self.head.parameters(), "lr": self.head.lr}]
        if self.head.finetune_backbone:
            groups.append({"params": self.backbone.model.parameters(), "lr": self.head.backbone_lr})
        return torch.optim.AdamW(groups)

    def on_train_start(self) -> None:
        self.backbone.model.train(self.head.finetune_backbone)


def train_linear_head(backbone: LayerwiseBackbone, head: LinearHead, datamodule: Any, progress: bool = True,
                      **trainer_kwargs: Any) -> None:
    """Fit ``head`` on the datamodule's train split with ``trainer.fit``; the backbone ends frozen in eval mode."""
    backbone.requires_grad_(head.finetune_backbone)
    module = LinearHeadTraining(backbone, head)
    kwargs = dict(max_epochs=head.max_epochs, logger=False, enable_checkpointing=False,
                  enable_progress_bar=progress, enable_model_summary=False, accelerator="cpu",
                  num_sanity_val_steps=0)
    kwargs.update(trainer_kwargs)
    trainer = L.Trainer(**kwargs)
    trainer.fit(module, train_dataloaders=datamodule.train_dataloader(),
                val_dataloaders=datamodule.val_dataloader() if hasattr(datamodule, "val_dataloader") else None)
    backbone.requires_grad_(False)
    backbone.model.eval()
    head.eval()
