"""CALM's confidence exits (Schuster et al. 2022) on a decoder: ``exit=confidence``.

A generated token leaves at the first checked layer where the LM head is confident enough: the softmax
response, top-1 minus top-2 probability of the LM head read at that layer (``measure=softmax``, the method the
issue and CALM's main results use), or the hidden-state saturation, the cosine of the token's states at the
previous checked layer and this one (``measure=saturation``, CALM's cheap measure: no head read until exit).
Its state is copied to the layers above, whose keys and values later tokens attend to (the decoding loop's
state propagation). Prompt tokens run every layer. ``min_layer`` and ``every`` choose the layers checked: a
softmax check reads the whole vocabulary (V x H multiply-adds, 8 layers' worth on SmolLM2), so checking fewer
layers is what makes it pay.

The threshold is chosen on the validation split (``exit.target``, as in classification): ``accuracy`` picks the
fastest grid threshold (fewest mean exit layers) whose validation ROUGE-L is at least the full model's minus
``max_drop`` (0.01 = one ROUGE point); ``mean_layer`` the best ROUGE-L within ``max_layer`` mean exit layers.
Each grid value is an actual decoding pass over (the first ``calibration_examples`` of) the validation split;
the result is cached by content. Early layers read through the LM head need training: with ``max_epochs > 0``,
:meth:`ConfidenceGeneration.fit` first runs CALM's joint fine-tune (every layer's LM loss, deeper layers
weighing more) with the shared budget.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from raee.atomic import atomic_write_text
from raee.calibration.target import CalibrationTarget, choose_point
from raee.errors import UserError
from raee.exits.base import check_layer
from raee.generation import finetuning
from raee.generation.strategies import FullGeneration, GenerationExit

MEASURES = ("softmax", "saturation")
DEFAULT_GRIDS = {"softmax": (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2),
                 "saturation": (0.999, 0.998, 0.995, 0.99, 0.98, 0.95, 0.9)}


def stored_full_point(result: dict[str, Any], num_layers: int | None) -> dict[str, Any]:
    """The full model's validation point of a cached calibration record; a record written before that point was
    stored gets it rebuilt from its figures (every layer, FLOPs speed-up 1; layers None when not known)."""
    if "full" in result:
        return result["full"]
    layers = None if num_layers is None else float(num_layers)
    return {"value": None, "accuracy": result["validation"]["full_accuracy"], "mean_exit_layer": layers,
            "mean_layers_computed": layers, "flops_speedup": 1.0, "num_examples": result.get("num_examples")}


def softmax_gap(logits: torch.Tensor) -> torch.Tensor:
    """(n, V) logits -> (n,) top-1 minus top-2 softmax probability."""
    top = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


class ConfidenceGeneration(GenerationExit):
    """Per-token confidence exits for generation (see the module docstring)."""

    name = "confidence"
    dynamic = True

    def __init__(self, threshold: float = 0.9, measure: str = "softmax", min_layer: int = 1, every: int = 1,
                 target: str | None = None, max_drop: float = 0.01, max_layer: float | None = None,
                 grid: list[float] | None = None, calibration_examples: int | None = 100,
                 max_epochs: int = 0, lr: float = 5e-5, warmup: float = 0.1, weight_decay: float = 0.01,
                 seed: int = 42, max_steps: int = -1, limit_train_batches: int | float | None = None) -> None:
        super().__init__()
        if measure not in MEASURES:
            raise UserError(f"exit.measure={measure!r}: use softmax (top-1 minus top-2 probability of the LM head) "
                            "or saturation (cosine of consecutive hidden states)")
        if not 0.0 <= float(threshold) <= 1.0:
            raise UserError(f"exit.threshold={threshold} must lie in [0, 1] (a probability gap or a cosine)")
        if int(every) < 1:
            raise UserError(f"exit.every={every} must be >= 1 (check every layer from min_layer on: 1)")
        if calibration_examples is not None and int(calibration_examples) < 1:
            raise UserError(f"exit.calibration_examples={calibration_examples} must be >= 1, or null for the whole "
                            "validation split")
        self.threshold, self.measure = float(threshold), measure
        self.min_layer, self.every = int(min_layer), int(every)
        self.calibration = CalibrationTarget(target=target, max_drop=float(max_drop),
                                             max_layer=None if max_layer is None else float(max_layer),
                                             grid=None if grid is None else tuple(float(v) for v in grid))
        self.calibration_examples = None if calibration_examples is None else int(calibration_examples)
        self.finetune_settings = {"max_epochs": int(max_epochs), "lr": float(lr), "warmup": float(warmup),
                                  "weight_decay": float(weight_decay), "seed": int(seed), "max_steps": int(max_steps),
                                  "limit_train_batches": limit_train_batches}
        self.needs_logits = measure == "softmax"
        self.calibration_result: dict[str, Any] | None = None
        self.trained: dict[str, Any] | None = None

    # ------------------------------------------------------------------ settings
    def validate(self, num_layers: int) -> None:
        check_layer(self.min_layer, num_layers, "exit.min_layer")
        if self.min_layer < 1:
            raise UserError("exit.min_layer=0 would read the embeddings: give a layer >= 1")

    def knobs(self) -> dict[str, Any]:
        # a calibration that found no threshold good enough chose no exit (an infinite threshold): shown as None
        threshold = self.threshold if math.isfinite(self.threshold) else None
        knobs = {"measure": self.measure, "threshold": threshold, "min_layer": self.min_layer}
        if self.every != 1:
            knobs["every"] = self.every
        if self.finetune_settings["max_epochs"] > 0:
            knobs["max_epochs"] = self.finetune_settings["max_epochs"]
        return {**knobs, **self.calibration.describe()}

    def budget(self) -> dict[str, Any] | None:
        return self.trained

    def checks(self, layer: int) -> bool:
        """Whether the exit is considered after ``layer`` (never under no exit: a check costs an LM-head read)."""
        return math.isfinite(self.threshold) and layer >= self.min_layer and (layer - self.min_layer) % self.every == 0

    # ------------------------------------------------------------------ the rule
    def should_exit(self, layer: int, logits: torch.Tensor | None, hidden: torch.Tensor | None = None,
                    previous: torch.Tensor | None = None) -> torch.Tensor:
        """(n,) bool: the read tokens confident enough at ``layer``. softmax: from (n, V) logits; saturation: from the
        (n, H) states at this layer and at the previous checked one (none before the first check: no exit)."""
        if self.measure == "softmax":
            return softmax_gap(logits) >= self.threshold
        if previous is None:
            return torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        return torch.nn.functional.cosine_similarity(hidden.float(), previous.float(), dim=-1) >= self.threshold

    # ------------------------------------------------------------------ fit: joint fine-tune, then calibration
    def fit(self, backbone: Any, head: Any, datamodule: Any, cache_dir: Any = None, progress: bool = True) -> None:
        self.prepare(backbone, head)
        if self.finetune_settings["max_epochs"] > 0 and self.finetune_settings["max_steps"] != 0:
            self.trained = finetuning.finetune("confidence", backbone, head, datamodule, loss="joint",
                                               settings={"method": "calm_joint", **self.finetune_settings},
                                               cache_dir=cache_dir, progress=progress)
        if self.calibration.active:
            self.calibrate(backbone, head, datamodule, cache_dir=cache_dir, progress=progress)

    def calibrate(self, backbone: Any, head: Any, datamodule: Any, cache_dir: Any = None,
                  progress: bool = True) -> dict[str, Any]:
        """Choose the threshold on the validation split (never test) by ``exit.target``; sets it and returns the
        record (chosen value, its validation ROUGE-L and mean exit layer, the full model's, the whole curve)."""
        from raee.experiment import fingerprint

        grid = list(self.calibration.grid or DEFAULT_GRIDS[self.measure])
        description = {"method": "confidence", "measure": self.measure, "min_layer": self.min_layer,
                       "every": self.every, "grid": grid, "target": self.calibration.describe(),
                       "examples": self.calibration_examples, "backbone": backbone.describe(),
                       "weights": self.trained, "head": head.describe(), "data": datamodule.describe()}
        key = fingerprint(description)
        path = Path(cache_dir) / "calibration" / f"{key}.json" if cache_dir is not None else None
        result = None
        if path is not None and path.exists():
            try:
                result = json.loads(path.read_text())["result"] | {"cached": True}
                result["full"] = stored_full_point(result, backbone.num_layers)
            except (OSError, json.JSONDecodeError, KeyError):
                result = None  # damaged: calibrate again and overwrite
        if result is None:
            result = self._calibrate(backbone, head, datamodule, grid, progress)
            if path is not None:
                atomic_write_text(path, json.dumps({"description": description, "result": result}, indent=1,
                                                   default=str))
        # the cache holds measurements (the curve, the full model's); the choice is made again from them, so a
        # change of the rule applies to cached calibrations too
        result = result | self.choose(result["curve"], result["full"])
        self.threshold = math.inf if result["value"] is None else float(result["value"])
        self.calibration_result = result | {"cache_key": key}
        if result["value"] is None:
            best = max(result["curve"], key=lambda p: p["accuracy"])
            warnings.warn(f"confidence: no threshold in the grid meets {self.calibration.describe()} on the "
                          f"validation split (the best, threshold={best['value']:g}, scores ROUGE-L "
                          f"{best['accuracy']:.4f} against the full model's "
                          f"{result['validation']['full_accuracy']:.4f}): the calibrated choice is no exit, "
                          "the full model; try a higher exit.min_layer, a longer fine-tune or exit.grid values "
                          "closer to 1", stacklevel=2)
        elif not result["met"]:
            warnings.warn(f"confidence: no threshold in the grid meets {self.calibration.describe()} on the "
                          f"validation split; using threshold={self.threshold:g} (validation ROUGE-L "
                          f"{result['validation']['accuracy']:.4f}, full model "
                          f"{result['validation']['full_accuracy']:.4f})", stacklevel=2)
        return self.calibration_result

    def _calibrate(self, backbone: Any, head: Any, datamodule: Any, grid: list[float], progress: bool
                   ) -> dict[str, Any]:
        from raee.generation.evaluate import decode_split

        def point(strategy: GenerationExit, value: float | None) -> dict[str, Any]:
            run = decode_split(backbone, head, strategy, datamodule, "validation", warmup_batches=0,
                               max_examples=self.calibration_examples, progress=progress,
                               desc=f"calibrating {self.name}: {'full' if value is None else value}")
            stats = run.stats
            return {"value": value, "accuracy": stats["rougeL"], "mean_exit_layer": stats["mean_exit_layer"],
                    "mean_layers_computed": stats["mean_exit_layer"], "flops_speedup": stats["flops_speedup"],
                    "num_examples": stats["num_examples"]}

        reference = FullGeneration()
        reference.prepare(backbone, head)
        full = point(reference, None)
        before = self.threshold
        curve = []
        try:
            for value in grid:
                self.threshold = float(value)
                curve.append(point(self, float(value)))
        finally:
            self.threshold = before
        return {"knob": "threshold", **self.calibration.describe(), "metric": "rougeL", "split": "validation",
                "num_examples": full["num_examples"], "full": full, "curve": curve}

    def choose(self, curve: list[dict[str, Any]], full: dict[str, Any]) -> dict[str, Any]:
        """The chosen threshold (None: no exit), whether it meets the target, and its validation figures."""
        # target=accuracy: no exit (the full model, value None) is a candidate too, so a grid whose every
        # threshold loses more than max_drop falls back to it rather than to the least bad threshold
        candidates = curve + ([{**full, "value": None}] if self.calibration.target == "accuracy" else [])
        chosen, met = choose_point(candidates, self.calibration, full["accuracy"])
        return {"value": chosen["value"], "met": met,
                "validation": {"accuracy": chosen["accuracy"], "full_accuracy": full["accuracy"],
                               "mean_exit_layer": chosen["mean_exit_layer"],
                               "mean_layers_computed": chosen["mean_layers_computed"],
                               "flops_speedup": chosen["flops_speedup"]}}
