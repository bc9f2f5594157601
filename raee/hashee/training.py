"""Lightning fine-tuning of a backbone with HashEE's token exits in place.

The backbone and the linear head's layer-L classifier are trained together on layer L's output
(cross-entropy, or MSE for regression; the classification token runs every layer); the token exit
assignment stays fixed. The classifier starts fresh (drawn from ``seed``) and the backbone from
its starting weights, as in standard fine-tuning. Optimiser as in the authors' script and in
PABEE's joint training here (:func:`raee.training.warmup_linear_adamw`): AdamW, weight decay off
for biases and LayerNorm, linear warm-up then linear decay, gradient clipping.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from raee.backbones.base import LayerwiseBackbone
from raee.features import encode_batch
from raee.logs import labelled_progress_bar
from raee.hashee.token_layer import TokenExits, forward_with_token_exits
from raee.training import parameter_groups, task_loss, warmup_linear_adamw


class HashEETraining(L.LightningModule):
    """Task loss of ``head`` at layer L after a forward pass with token exits."""

    def __init__(self, backbone: LayerwiseBackbone, head: Any, exits: TokenExits, lr: float,
                 head_lr: float, weight_decay: float, warmup: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.exits = exits
        self.lr, self.head_lr, self.weight_decay, self.warmup = lr, head_lr, weight_decay, warmup

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """batch (data-module format) -> (B, C) outputs of the layer-L classifier."""
        inputs = encode_batch(self.backbone, self.head, batch)
        state = forward_with_token_exits(self.backbone, inputs, self.exits)
        return self.head(state)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        labels = batch["label"].to(self.device)
        loss = task_loss(self(batch), labels, getattr(self.head, "regression", False))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        classifier = self.head.classifiers[self.backbone.num_layers]
        groups = parameter_groups(self.backbone.model, self.lr, self.weight_decay)
        groups.append({"params": list(classifier.parameters()), "lr": self.head_lr, "weight_decay": 0.0})
        return warmup_linear_adamw(groups, self.trainer.estimated_stepping_batches, self.warmup)


def finetune_with_token_exits(backbone: LayerwiseBackbone, head: Any, exits: TokenExits,
                              datamodule: Any, *, max_epochs: int = 1, lr: float = 2e-5,
                              head_lr: float | None = None, weight_decay: float = 0.01, warmup: float = 0.1,
                              gradient_clip_val: float | None = 1.0, limit_train_batches: int | float | None = None,
                              max_steps: int = -1, seed: int = 42, progress: bool = True) -> int:
    """``trainer.fit`` on the train split; afterwards the backbone is frozen and in eval mode again,
    and backbone and head are back on the device they started on. Returns the optimiser steps taken.

    exits: a (V,) token -> layer map or a function of (input_ids, attention_mask) (see TokenExits).
    """
    device = backbone.device
    L_ = backbone.num_layers
    L.seed_everything(seed, workers=True, verbose=False)  # classifier start and dropout depend on ``seed`` alone
    classifier = head.classifiers[L_]
    classifier.reset_parameters()
    backbone.model.requires_grad_(True)
    classifier.requires_grad_(True)
    module = HashEETraining(backbone, head, exits, lr=lr, head_lr=head_lr if head_lr is not None else lr,
                            weight_decay=weight_decay, warmup=warmup)
    trainer = L.Trainer(
        max_epochs=max_epochs, max_steps=max_steps, accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=progress,
        callbacks=[labelled_progress_bar()] if progress else None,
        enable_model_summary=False, num_sanity_val_steps=0, gradient_clip_val=gradient_clip_val,
        limit_train_batches=1.0 if limit_train_batches is None else limit_train_batches)
    backbone.train()  # dropout on, as in the paper's fine-tuning
    head.train()
    try:
        trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
    finally:
        # Lightning's teardown moves the module to the CPU; put everything back as it was
        backbone.requires_grad_(False)
        backbone.to(device)
        head.to(device)
        backbone.eval()
        head.eval()
    return int(trainer.global_step)
