"""The training loop of generation fine-tunes: a causal LM on (prompt, target) token-id pairs, the loss on the
target tokens only (:mod:`raee.generation.finetune` caches the results by content).

Three losses (:data:`LOSSES`), one recipe: AdamW with weight decay off for biases and norms, linear
warm-up then linear decay, gradient clipping (:func:`raee.training.warmup_linear_adamw`, the recipe of
every classification fine-tune too), seeded batch order.

- ``last``: the ordinary loss at layer L (:func:`raee.generation.lm_losses.last_layer_loss`). With no token
  exits this is also HashEE's ``hash=none`` reference.
- ``joint``: CALM's weighted average of every layer's loss through the final norm and LM head
  (:func:`raee.generation.lm_losses.joint_loss`), so that early layers can answer (confidence exits,
  self-speculative drafts).
- ``token_exits``: HashEE's fine-tune with the token exits in place: every token's exit layer comes from
  ``token_exits`` (a function of the batch's input ids); above its exit a token's state is copied upward,
  and later tokens attend to the copy; each prediction is read from the state a token holds after its exit
  layer, exactly as the decoding loop reads it (teacher forcing with exits, ``exit_forward``).

Progress (steps, examples/s, time left, loss) goes to the ``raee`` logger, i.e. the job's log file as well
as the terminal, every ``log_every_s`` seconds, and Lightning's progress bar shows it on a terminal.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from raee.backbones.base import LayerState, LayerwiseBackbone
from raee.errors import UserError
from raee.generation.lm_losses import joint_loss, last_layer_loss
from raee.logs import labelled_progress_bar
from raee.training import parameter_groups, warmup_linear_adamw

log = logging.getLogger("raee.generation.finetune")

#: the fine-tuning losses
LOSSES = ("last", "joint", "token_exits")

#: (prompt ids, target ids) of one training example; the target ends with the end-of-sequence token
Pair = tuple[Sequence[int], Sequence[int]]

#: how a batch's tokens get their exit layers: (input_ids (B, T), attention_mask (B, T), reads (B, T) bool: the
#: positions whose next token is predicted, from the last prompt token on) -> (B, T) exit layers 0..L
TokenExitFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

#: the teacher-forced forward pass with token exits, differentiable and cache-free: (backbone, input_ids (B, T),
#: attention_mask (B, T), token_exit (B, T)) -> (B, T, H), every position's state after its exit layer
ExitForward = Callable[[LayerwiseBackbone, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def collate_pairs(pairs: Sequence[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``prompt + target`` sequences.

    Returns input_ids (B, T), attention_mask (B, T) and target_mask (B, T) bool (True at target tokens).
    """
    if not pairs:
        raise UserError("no training pairs: the train split is empty")
    lengths = [len(p) + len(t) for p, t in pairs]
    T = max(lengths)
    ids = torch.full((len(pairs), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(pairs), T), dtype=torch.long)
    target = torch.zeros((len(pairs), T), dtype=torch.bool)
    for i, (prompt, tgt) in enumerate(pairs):
        if not len(prompt) or not len(tgt):
            raise UserError(f"training pair {i} has an empty {'prompt' if not len(prompt) else 'target'}: every "
                            "example needs a source text and a target text")
        n = len(prompt) + len(tgt)
        ids[i, :n] = torch.tensor([*prompt, *tgt], dtype=torch.long)
        mask[i, :n] = 1
        target[i, len(prompt):n] = True
    return {"input_ids": ids, "attention_mask": mask, "target_mask": target}


def reference_forward_with_exits(backbone: LayerwiseBackbone, input_ids: torch.Tensor,
                                 attention_mask: torch.Tensor, token_exit: torch.Tensor) -> torch.Tensor:
    """Reference form of the teacher-forced forward with token exits: each layer is the model's own, run on every
    token, after which a token whose exit layer is below it keeps its input state (the copy). Keys and values of
    an exited token thus come from its copied state, as in the decoding loop; its query and feed-forward are
    computed and thrown away. Returns (B, T, H)."""
    state = backbone.embed(input_ids, attention_mask)
    for layer in range(1, backbone.num_layers + 1):
        out = backbone.run_layer(state)
        hidden = torch.where((token_exit >= layer).unsqueeze(-1), out.hidden, state.hidden)
        state = LayerState(hidden=hidden, attention_mask=state.attention_mask, input_ids=state.input_ids,
                           layer=layer, extras=state.extras)
    return state.hidden


def default_exit_forward() -> ExitForward:
    """The decoding loop's own differentiable step (:func:`raee.generation.step.forward_with_exits`), so that
    training with exits computes what decoding computes; the reference form where that module is absent."""
    try:
        from raee.generation.step import forward_with_exits
    except ImportError:
        return reference_forward_with_exits
    return forward_with_exits


def reads_of(target_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the positions whose next token is a target token (the last prompt token .. the last but one
    target token)."""
    reads = torch.zeros_like(target_mask, dtype=torch.bool)
    reads[:, :-1] = target_mask[:, 1:]
    return reads


def lm_parameters(backbone: LayerwiseBackbone) -> list[torch.nn.Parameter]:
    """The backbone's parameters plus its LM head's, each once (a tied head shares the embedding matrix)."""
    seen: set[int] = set()
    out = []
    modules = [backbone.model] + ([backbone.lm_head] if backbone.lm_head is not None else [])
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


class GenerationFinetuning(L.LightningModule):
    """One of :data:`LOSSES` on a batch of :func:`collate_pairs`."""

    def __init__(self, backbone: LayerwiseBackbone, loss: str, lr: float, weight_decay: float, warmup: float,
                 token_exits: TokenExitFn | None = None, exit_forward: ExitForward | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.lm_head = backbone.lm_head
        self.loss_name, self.token_exits = loss, token_exits
        self.exit_forward = exit_forward or default_exit_forward()
        self.lr, self.weight_decay, self.warmup = lr, weight_decay, warmup
        self.layer_losses: torch.Tensor | None = None  # (L,) running mean of the joint loss's layers
        self.last_loss: float | None = None

    def exit_layers(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T) exit layer of every position, from the token exits (which see the read positions)."""
        ids = batch["input_ids"]
        return self.token_exits(ids, batch["attention_mask"], reads_of(batch["target_mask"])).to(ids.device)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask, target = batch["input_ids"], batch["attention_mask"], batch["target_mask"]
        if self.loss_name == "token_exits":
            hidden = self.exit_forward(self.backbone, ids, mask, self.exit_layers(batch))
            return last_layer_loss(self.backbone, hidden, target, ids)
        states = self.backbone.all_layers(ids, mask)
        if self.loss_name == "last":
            return last_layer_loss(self.backbone, states[-1].hidden, target, ids)
        loss, per_layer = joint_loss(self.backbone, [s.hidden for s in states[1:]], target, ids)
        self.layer_losses = per_layer if self.layer_losses is None else 0.9 * self.layer_losses + 0.1 * per_layer
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.last_loss = float(loss.detach())
        self.log("train/loss", loss, prog_bar=True, batch_size=int(batch["input_ids"].shape[0]))
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        groups = parameter_groups(lm_parameters(self.backbone), self.lr, self.weight_decay)
        return warmup_linear_adamw(groups, self.trainer.estimated_stepping_batches, self.warmup)


@dataclass
class ProgressLog(L.Callback):
    """Logs steps done, examples/s, time spent and left, and the loss every ``every_s`` seconds and at the end
    (to the ``raee`` logger: the job's log file and the console)."""

    every_s: float = 30.0
    what: str = "fine-tune"
    started: float = field(default=0.0, init=False)
    last: float = field(default=0.0, init=False)
    examples: int = field(default=0, init=False)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = self.last = time.perf_counter()
        self.examples = 0
        log.info("%s: %d optimiser steps", self.what, trainer.estimated_stepping_batches)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.examples += int(batch["input_ids"].shape[0])
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            log.info("%s", self.line(trainer, pl_module, now))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log.info("%s (done)", self.line(trainer, pl_module, time.perf_counter()))

    def line(self, trainer: L.Trainer, pl_module: L.LightningModule, now: float) -> str:
        step, total = int(trainer.global_step), max(int(trainer.estimated_stepping_batches), 1)
        spent = now - self.started
        left = spent / step * (total - step) if step else float("nan")
        loss = getattr(pl_module, "last_loss", None)
        return (f"{self.what}: step {step}/{total} ({100 * step / total:.0f}%), {self.examples / max(spent, 1e-9):.2f} "
                f"examples/s, {format_seconds(spent)} spent, ~{format_seconds(left)} left"
                + (f", loss {loss:.4f}" if loss is not None else ""))


def format_seconds(seconds: float) -> str:
    """'1h02m', '4m05s', '12s' (or '?' when unknown)."""
    if seconds != seconds or seconds < 0:  # nan
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


@dataclass
class FinetuneStats:
    """What one fine-tune did (saved beside its weights)."""

    steps: int
    examples: int
    seconds: float
    final_loss: float | None
    layer_losses: list[float] | None = None

    @property
    def examples_per_s(self) -> float:
        return self.examples / self.seconds if self.seconds else 0.0


def finetune_generation(backbone: LayerwiseBackbone, pairs: Sequence[Pair], *, loss: str = "last",
                        token_exits: TokenExitFn | None = None, exit_forward: ExitForward | None = None,
                        batch_size: int = 8, max_epochs: int = 1,
                        lr: float = 5e-5, weight_decay: float = 0.01, warmup: float = 0.1,
                        gradient_clip_val: float | None = 1.0, max_steps: int = -1, seed: int = 42,
                        progress: bool = True, log_every_s: float = 30.0) -> FinetuneStats:
    """``trainer.fit`` of backbone + LM head on ``pairs`` with ``loss``; afterwards the backbone is frozen, in
    eval mode and on the device it started on.

    token_exits / exit_forward: loss="token_exits" only (see :class:`GenerationFinetuning`).
    """
    check_finetune_settings(loss, token_exits, max_epochs, lr, warmup, batch_size)
    if backbone.lm_head is None:
        raise UserError(f"backbone '{backbone.name}' has no LM head: generation fine-tuning needs a causal LM "
                        "with its LM head (e.g. backbone=smollm2)")
    device = backbone.device
    L.seed_everything(seed, workers=True, verbose=False)
    pad_id = backbone.tokenizer.pad_token_id if backbone.tokenizer.pad_token_id is not None else 0
    loader = DataLoader(list(pairs), batch_size=batch_size, shuffle=True,
                        collate_fn=lambda b: collate_pairs(b, pad_id),
                        generator=torch.Generator().manual_seed(seed))
    module = GenerationFinetuning(backbone, loss, lr=lr, weight_decay=weight_decay, warmup=warmup,
                                  token_exits=token_exits, exit_forward=exit_forward)
    reporter = ProgressLog(every_s=log_every_s, what=f"fine-tune ({loss} loss, {len(pairs)} examples)")
    callbacks: list[Any] = [reporter] + ([labelled_progress_bar()] if progress else [])
    trainer = L.Trainer(max_epochs=max_epochs, max_steps=max_steps,
                        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=progress, callbacks=callbacks,
                        enable_model_summary=False, num_sanity_val_steps=0, gradient_clip_val=gradient_clip_val)
    for p in lm_parameters(backbone):
        p.requires_grad_(True)
    backbone.train()
    started = time.perf_counter()
    try:
        trainer.fit(module, train_dataloaders=loader)
    finally:
        # Lightning's teardown moves the module to the CPU; put everything back as it was
        for p in lm_parameters(backbone):
            p.requires_grad_(False)
        backbone.to(device)
        if backbone.lm_head is not None:
            backbone.lm_head.to(device)
        backbone.eval()
    layer_losses = module.layer_losses.tolist() if module.layer_losses is not None else None
    return FinetuneStats(steps=int(trainer.global_step), examples=reporter.examples,
                         seconds=time.perf_counter() - started, final_loss=module.last_loss,
                         layer_losses=layer_losses)


def check_finetune_settings(loss: str, token_exits: TokenExitFn | None, max_epochs: int, lr: float, warmup: float,
                            batch_size: int) -> None:
    """A clear error for settings no fine-tune can run with."""
    if loss not in LOSSES:
        raise UserError(f"fine-tuning loss {loss!r} is unknown: choose one of {list(LOSSES)}")
    if loss == "token_exits" and token_exits is None:
        raise UserError("loss=token_exits needs the token exits (a function of the input ids giving each token's "
                        "exit layer, e.g. HashEE's hash)")
    if max_epochs < 1:
        raise UserError(f"finetune.max_epochs={max_epochs} must be >= 1 for a generation fine-tune "
                        "(use the zero-shot model to skip fine-tuning)")
    if lr <= 0:
        raise UserError(f"finetune.lr={lr} must be a positive learning rate")
    if not 0.0 <= warmup < 1.0:
        raise UserError(f"finetune.warmup={warmup} is the warm-up share of the steps: give 0 <= warmup < 1")
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size} must be >= 1")
