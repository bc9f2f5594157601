"""Lightning fine-tuning of a backbone with HashEE's token exits in place.

The backbone and the linear head's last-layer classifier are trained together with
cross-entropy on layer L (the classification token runs every layer); the token -> layer
map stays fixed. Optimiser as in the authors' script: AdamW, weight decay off for biases and
LayerNorm, linear warm-up then linear decay, gradient clipping.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.nn import functional as F

from raee.backbones.base import LayerwiseBackbone
from raee.features import encode_batch
from raee.hashee.token_layer import forward_with_token_exits


class HashEETraining(L.LightningModule):
    """Cross-entropy of ``head`` at layer L after a forward pass with token exits."""

    def __init__(self, backbone: LayerwiseBackbone, head: Any, token_to_layer: torch.Tensor, lr: float,
                 head_lr: float, weight_decay: float, warmup: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.register_buffer("token_to_layer", token_to_layer.long().clone(), persistent=False)
        self.lr, self.head_lr, self.weight_decay, self.warmup = lr, head_lr, weight_decay, warmup

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """batch (data-module format) -> (B, C) logits of the layer-L classifier."""
        inputs = encode_batch(self.backbone, self.head, batch)
        state = forward_with_token_exits(self.backbone, inputs, self.token_to_layer)
        return self.head(state)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        labels = batch["label"].long().to(self.device)
        loss = F.cross_entropy(self(batch), labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        classifier = self.head.classifiers[self.backbone.num_layers]
        decay, no_decay = [], []
        for p in self.backbone.model.parameters():
            (decay if p.dim() >= 2 else no_decay).append(p)  # why: biases and LayerNorm are not decayed
        groups = [{"params": decay, "lr": self.lr, "weight_decay": self.weight_decay},
                  {"params": no_decay, "lr": self.lr, "weight_decay": 0.0},
                  {"params": list(classifier.parameters()), "lr": self.head_lr, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warm = int(self.warmup * total)

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / (warm + 1)
            return max(0.0, (total - step) / max(total - warm, 1))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def finetune_with_token_exits(backbone: LayerwiseBackbone, head: Any, token_to_layer: torch.Tensor,
                              datamodule: Any, *, max_epochs: int = 1, lr: float = 2e-5,
                              head_lr: float | None = None, weight_decay: float = 0.01, warmup: float = 0.1,
                              gradient_clip_val: float | None = 1.0, limit_train_batches: int | float | None = None,
                              max_steps: int = -1, progress: bool = True) -> None:
    """``trainer.fit`` on the train split; afterwards the backbone is frozen and in eval mode again,
    and backbone and head are back on the device they started on."""
    device = backbone.device
    L_ = backbone.num_layers
    backbone.model.requires_grad_(True)
    head.classifiers[L_].requires_grad_(True)
    module = HashEETraining(backbone, head, token_to_layer, lr=lr, head_lr=head_lr if head_lr is not None else lr,
                            weight_decay=weight_decay, warmup=warmup)
    trainer = L.Trainer(
        max_epochs=max_epochs, max_steps=max_steps, accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=progress,
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
