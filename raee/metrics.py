"""Task metrics and exit statistics of a finished run (torchmetrics for the task metrics)."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score, multiclass_matthews_corrcoef


def task_metrics(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy, macro-F1 and Matthews correlation of (N,) predictions against (N,) labels."""
    preds, target = predictions.long(), labels.long()
    if num_classes < 2:
        return {"accuracy": float((preds == target).float().mean()), "macro_f1": None, "mcc": None}
    return {
        "accuracy": float(multiclass_accuracy(preds, target, num_classes=num_classes, average="micro")),
        "macro_f1": float(multiclass_f1_score(preds, target, num_classes=num_classes, average="macro")),
        "mcc": float(multiclass_matthews_corrcoef(preds, target, num_classes=num_classes)),
    }


def exit_statistics(exit_layers: torch.Tensor, num_layers: int) -> dict[str, Any]:
    """Mean exit layer, layer speed-up L / mean, share of layers saved, and the exit histogram."""
    mean = float(exit_layers.float().mean()) if exit_layers.numel() else float("nan")
    return {
        "mean_exit_layer": mean,
        "layer_speedup": (num_layers / mean) if mean > 0 else None,
        "layers_saved": 1.0 - mean / num_layers,
        "exit_layer_counts": torch.bincount(exit_layers.long(), minlength=num_layers + 1).tolist(),
    }


def computed_layer_statistics(layer_examples: list[int], num_examples: int, num_layers: int) -> dict[str, Any]:
    """From the backbone's per-layer example counts (layer_examples[l] = examples layer l ran on):
    the mean number of layers computed per example (a planned strategy runs the layers before its
    key layer for every example, whatever its exit) and L / that mean."""
    mean = sum(layer_examples) / num_examples if num_examples else float("nan")
    return {"mean_layers_computed": mean, "computed_layer_speedup": (num_layers / mean) if mean > 0 else None}
