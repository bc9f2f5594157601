"""Lightning training of internal classifiers (and optionally the backbone), and the pieces every
fine-tune shares (PABEE's joint training here, HashEE's in :mod:`raee.hashee.training`): the task
loss and the optimiser recipe, so that methods compared on one budget are also trained alike."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F

from raee.backbones.base import LayerwiseBackbone
from raee.features import encode_batch
from raee.logs import labelled_progress_bar
from raee.heads.linear import LinearHead


def task_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool = False) -> torch.Tensor:
    """Cross-entropy of (B, C) logits against (B,) class ids, or MSE of (B, 1) outputs against (B,) targets."""
    if regression:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits, labels.long())


def parameter_groups(model: nn.Module | Iterable[nn.Parameter], lr: float,
                     weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups of ``model`` (a module or its parameters): matrices decayed, biases and LayerNorm weights
    not (BERT's recipe)."""
    decay, no_decay = [], []
    for p in (model.parameters() if isinstance(model, nn.Module) else model):
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "lr": lr, "weight_decay": weight_decay},
            {"params": no_decay, "lr": lr, "weight_decay": 0.0}]


def warmup_linear_adamw(groups: Iterable[dict[str, Any]], total_steps: int, warmup: float) -> dict[str, Any]:
    """AdamW with linear warm-up over ``warmup`` of ``total_steps``, then linear decay to 0 (stepped per
    batch); the dict ``configure_optimizers`` returns."""
    optimizer = torch.optim.AdamW(list(groups))
    total = max(int(total_steps), 1)
    warm = int(warmup * total)

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        return max(0.0, (total - step) / max(total - warm, 1))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class LinearHeadTraining(L.LightningModule):
    """Trains every layer's classifier with the head's loss weighting (sum or PABEE); with
    ``finetune_backbone`` the backbone too, with the fine-tuning recipe of :func:`warmup_linear_adamw`."""

    def __init__(self, backbone: LayerwiseBackbone, head: LinearHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.register_buffer("weights", head.layer_weights(), persistent=False)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        enc = encode_batch(self.backbone, self.head, batch)
        labels = batch["label"].to(self.device)
        with torch.set_grad_enabled(self.head.finetune_backbone):
            states = self.backbone.all_layers(**enc)
        losses = torch.stack([task_loss(self.head(s), labels, self.head.regression) for s in states])
        loss = (losses * self.weights).sum()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        enc = encode_batch(self.backbone, self.head, batch)
        labels = batch["label"].to(self.device)
        states = self.backbone.all_layers(**enc)
        out = self.head(states[-1])
        if self.head.regression:
            self.log("val/last_layer_mse", task_loss(out, labels, True), prog_bar=True, batch_size=len(labels))
        else:
            acc = (out.argmax(-1) == labels).float().mean()
            self.log("val/last_layer_acc", acc, prog_bar=True, batch_size=len(labels))

    def configure_optimizers(self) -> Any:
        head = self.head
        groups = [{"params": list(head.classifiers.parameters()), "lr": head.lr, "weight_decay": 0.0}]
        if not head.finetune_backbone:
            return torch.optim.AdamW(groups)  # DeeBERT's second stage: classifiers only, constant rate
        groups += parameter_groups(self.backbone.model, head.backbone_lr, head.weight_decay)
        return warmup_linear_adamw(groups, self.trainer.estimated_stepping_batches, head.warmup)

    def on_train_start(self) -> None:
        self.backbone.model.train(self.head.finetune_backbone)


def train_linear_head(backbone: LayerwiseBackbone, head: LinearHead, datamodule: Any, progress: bool = True,
                      **trainer_kwargs: Any) -> int:
    """Fit ``head`` on the datamodule's train split with ``trainer.fit`` (seeded by ``head.seed``); the
    backbone ends frozen in eval mode. Returns the number of optimiser steps taken."""
    L.seed_everything(head.seed, workers=True, verbose=False)
    head.reset_classifiers()  # why: the cache key holds head.seed, so the start must depend on it alone
    backbone.requires_grad_(head.finetune_backbone)
    module = LinearHeadTraining(backbone, head)
    kwargs = dict(max_epochs=head.max_epochs, logger=False, enable_checkpointing=False,
                  enable_progress_bar=progress, enable_model_summary=False, accelerator="cpu",
                  callbacks=[labelled_progress_bar()] if progress else None,
                  num_sanity_val_steps=0, gradient_clip_val=head.gradient_clip_val if head.finetune_backbone else None)
    kwargs.update(trainer_kwargs)
    trainer = L.Trainer(**kwargs)
    try:
        trainer.fit(module, train_dataloaders=datamodule.train_dataloader(),
                    val_dataloaders=datamodule.val_dataloader() if hasattr(datamodule, "val_dataloader") else None)
    finally:
        backbone.requires_grad_(False)
        backbone.model.eval()
        head.eval()
    return int(trainer.global_step)
