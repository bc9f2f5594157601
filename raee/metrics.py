"""Task metrics and exit statistics of a finished run (torchmetrics for the task metrics)."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics.functional import mean_absolute_error, mean_squared_error, pearson_corrcoef, spearman_corrcoef
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score, multiclass_matthews_corrcoef


def task_metrics(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 regression: bool = False) -> dict[str, float | None]:
    """Classification: accuracy, macro-F1 and Matthews correlation of (N,) class predictions.
    Regression: Pearson and Spearman correlation, MSE and MAE of (N,) real predictions."""
    if regression:
        preds, target = predictions.double(), labels.double()
        constant = preds.numel() < 2 or bool(preds.std() == 0) or bool(target.std() == 0)
        return {  # a correlation with a constant series is undefined: None, not NaN
            "pearson": None if constant else float(pearson_corrcoef(preds, target)),
            "spearman": None if constant else float(spearman_corrcoef(preds, target)),
            "mse": float(mean_squared_error(preds, target)), "mae": float(mean_absolute_error(preds, target)),
        }
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
