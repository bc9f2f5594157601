"""The exit loop: run a batch layer by layer, let examples leave, never compute past an exit.

This is the one place where layers are stepped through at inference. Read it top to bottom:
embed -> (plan) -> for each layer: decide who exits, predict for them, drop them, run the next
layer on the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raee.backbones.base import LayerState, LayerwiseBackbone
from raee.exits.base import BatchContext, DynamicExit, ExitStrategy, PlannedExit


@dataclass
class ExitResult:
    """Per-example outcome of one batch (all tensors (B,) on CPU, batch order)."""

    predictions: torch.Tensor  # class ids (long); for a regression head the predicted values (float)
    exit_layers: torch.Tensor
    confidences: torch.Tensor  # softmax probability of the predicted class at the exit layer (NaN for regression)
    logits: torch.Tensor  # (B, C) logits at the exit layer ((B, 1) outputs for regression)


@torch.no_grad()
def run_early_exit(backbone: LayerwiseBackbone, head: torch.nn.Module, strategy: ExitStrategy,
                   inputs: dict[str, torch.Tensor], ctx: BatchContext) -> ExitResult:
    """Run ``inputs`` (tokenised batch) through ``backbone`` with ``strategy`` deciding exits."""
    L = backbone.num_layers
    B = inputs["input_ids"].shape[0]
    C = head.num_classes
    logits_out = torch.zeros(B, C)
    exit_layers = torch.full((B,), -1, dtype=torch.long)
    strategy.begin(ctx)

    state = backbone.embed(**inputs)
    active = torch.arange(B, device=state.hidden.device)  # batch positions of the examples still running
    planned: torch.Tensor | None = None  # (B,) exit layers, once a planned strategy has decided
    early_states: list[LayerState] = []  # states before planning, for examples planned to exit there

    for layer in range(L + 1):
        if layer > 0:
            state = strategy.run_layer(backbone, state)

        if isinstance(strategy, PlannedExit):
            if layer < strategy.plan_layer:
                early_states.append(state)
                continue
            if planned is None:
                own = strategy.own_logits(state, ctx)
                if own is not None:  # the strategy answered everyone here (kNN): no head, no further layer
                    _record(own, active, layer, logits_out, exit_layers)
                    break
                planned = strategy.plan(state, ctx).clamp(0, L)
                # examples whose exit lies before the layer we planned at are read from kept states
                for early in early_states:
                    here = planned == early.layer
                    if here.any():
                        _record(head(backbone.select(early, here)), torch.nonzero(here).flatten(),
                                early.layer, logits_out, exit_layers)
                early_states.clear()
                keep = planned[active] >= layer
                if not keep.all():
                    state, active = backbone.select(state, keep), active[keep]
            leaving = (planned[active] == layer) | (layer == L)
            leavers, everyone = _count(leaving)
            if leavers:
                _record(head(state if everyone else backbone.select(state, leaving)),
                        active if everyone else active[leaving], layer, logits_out, exit_layers)
        else:
            assert isinstance(strategy, DynamicExit)
            strategy.observe(state, active, ctx)
            if layer < strategy.min_layer:
                continue
            logits = head(state)
            leaving = strategy.should_exit(layer, logits, active, ctx) | (layer == L)
            leavers, everyone = _count(leaving)
            if leavers:
                answer = strategy.answer(layer, logits, active, ctx)  # the head's logits unless the strategy answers
                _record(answer if everyone else answer[leaving], active if everyone else active[leaving], layer,
                        logits_out, exit_layers)

        if everyone:
            break
        if leavers:
            state, active = backbone.select(state, ~leaving), active[~leaving]

    if getattr(head, "regression", False):  # one real output: the prediction itself, no class confidence
        predictions, confidences = logits_out[:, 0].clone(), torch.full((B,), float("nan"))
    else:
        confidences, predictions = torch.softmax(logits_out.float(), dim=-1).max(-1)
    return ExitResult(predictions=predictions, exit_layers=exit_layers, confidences=confidences, logits=logits_out)


def _count(leaving: torch.Tensor) -> tuple[int, bool]:
    """(how many leave, whether all do): one read of the mask (at batch 1 the loop's torch calls add up)."""
    leavers = int(leaving.sum())
    return leavers, leavers == leaving.numel()


def _record(logits: torch.Tensor, positions: torch.Tensor, layer: int, logits_out: torch.Tensor,
            exit_layers: torch.Tensor) -> None:
    positions = positions.cpu()
    logits_out[positions] = logits.float().cpu()
    exit_layers[positions] = layer
