"""Calibration targets: what a user asks of an exit strategy, and the choice of its knob on validation.

``target=accuracy, max_drop=d``: the fastest setting (fewest mean layers computed) whose validation
accuracy is at least the full model's validation accuracy minus ``d``; ties go to the more accurate,
then to the earlier grid value. When no setting qualifies, the most accurate one (warned).

``target=mean_layer, max_layer=m``: the most accurate setting whose mean layers computed is at most
``m``; ties go to the faster, then to the earlier grid value. When none qualifies, the fastest (warned).

"Layers computed" counts the layers run before planning for every example (an example planned to
exit at layer 0 with keys at layer 2 still cost 2 layers); for dynamic strategies it is the exit layer.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from raee.errors import UserError

TARGETS = ("accuracy", "mean_layer")


@dataclass(frozen=True)
class CalibrationTarget:
    target: str | None = None  # None: use the knob as configured
    max_drop: float = 0.0  # target=accuracy: allowed validation accuracy drop below the full model's
    max_layer: float | None = None  # target=mean_layer: the most mean layers computed allowed
    grid: tuple[float, ...] | None = None  # candidate knob values (None: the strategy's default grid)

    def __post_init__(self) -> None:
        if self.target is not None and self.target not in TARGETS:
            raise UserError(f"exit.target={self.target!r} is unknown: use accuracy (with exit.max_drop), mean_layer "
                            "(with exit.max_layer) or null (no calibration)")
        if not (math.isfinite(float(self.max_drop)) and float(self.max_drop) >= 0):
            raise UserError(f"exit.max_drop={self.max_drop} must be a finite number >= 0 (accuracy points as a "
                            "fraction, e.g. 0.01 = one point below the full model)")
        if self.target == "mean_layer" and (self.max_layer is None or not float(self.max_layer) >= 0):
            raise UserError(f"exit.target=mean_layer needs exit.max_layer >= 0 (the mean layers allowed), got "
                            f"{self.max_layer}")
        if self.grid is not None and len(self.grid) == 0:
            raise UserError("exit.grid is empty: give the candidate knob values or null for the default grid")

    @property
    def active(self) -> bool:
        return self.target is not None

    def describe(self) -> dict[str, Any]:
        if self.target == "accuracy":
            return {"target": "accuracy", "max_drop": float(self.max_drop)}
        if self.target == "mean_layer":
            return {"target": "mean_layer", "max_layer": float(self.max_layer)}
        return {}


def choose_point(curve: Sequence[dict[str, Any]], target: CalibrationTarget, full_accuracy: float
                 ) -> tuple[dict[str, Any], bool]:
    """The point of ``curve`` (dicts with value, accuracy, mean_layers_computed, in grid order) that meets
    ``target``, and whether one met it (see the module docstring for the rule)."""
    if not curve:
        raise UserError("calibration has no candidate settings: the grid is empty; give the knob values to try "
                        "with exit.grid=[...]")
    order = list(range(len(curve)))
    acc = [float(p["accuracy"]) for p in curve]
    cost = [float(p["mean_layers_computed"]) for p in curve]
    tol = 1e-9  # accuracies are ratios of counts: compare without float noise
    if target.target == "accuracy":
        ok = [i for i in order if acc[i] >= full_accuracy - float(target.max_drop) - tol]
        if ok:
            return curve[min(ok, key=lambda i: (cost[i], -acc[i], i))], True
        best = min(order, key=lambda i: (-acc[i], cost[i], i))
    elif target.target == "mean_layer":
        ok = [i for i in order if cost[i] <= float(target.max_layer) + tol]
        if ok:
            return curve[min(ok, key=lambda i: (-acc[i], cost[i], i))], True
        best = min(order, key=lambda i: (cost[i], -acc[i], i))
    else:
        raise ValueError("no calibration target set (exit.target is null)")
    return curve[best], False


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set(obj: Any, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        obj = getattr(obj, part)
    if not hasattr(obj, last):
        raise AttributeError(f"{type(obj).__name__} has no knob {last!r} to calibrate")
    setattr(obj, last, type(getattr(obj, last))(value))


class Calibrated:
    """Mixin of exit strategies whose one knob (:attr:`knob`, an attribute path such as ``threshold`` or
    ``aggregator.threshold``) can be chosen on the validation split to meet a :class:`CalibrationTarget`.

    The strategy calls :meth:`init_calibration` in ``__init__``; :meth:`fit` calibrates (a strategy with its
    own ``fit`` calls :meth:`calibrate` at its end).
    """

    knob: str = "threshold"
    calibration: CalibrationTarget = CalibrationTarget()
    calibration_result: dict[str, Any] | None = None

    def init_calibration(self, target: str | None = None, max_drop: float = 0.0, max_layer: float | None = None,
                         grid: Sequence[float] | None = None) -> None:
        self.calibration = CalibrationTarget(target=target, max_drop=float(max_drop),
                                             max_layer=None if max_layer is None else float(max_layer),
                                             grid=None if grid is None else tuple(float(v) for v in grid))
        self.calibration_result = None

    def default_grid(self, num_layers: int, num_classes: int) -> list[float]:
        """Candidate knob values when the config gives none (empty: the user must give exit.grid)."""
        return []

    def fit(self, backbone: Any, head: Any, datamodule: Any, cache_dir: Any = None, progress: bool = True) -> None:
        """Strategies with nothing else to fit only calibrate (when a target is set)."""
        if self.calibration.active:
            self.calibrate(backbone, head, datamodule, cache_dir=cache_dir, progress=progress)

    def get_knob(self) -> Any:
        return _get(self, self.knob)

    def set_knob(self, value: Any) -> None:
        _set(self, self.knob, value)

    def with_calibration_knobs(self, knobs: dict[str, Any]) -> dict[str, Any]:
        """``knobs`` plus the calibration target (so calibrated runs stand apart in reports)."""
        return {**knobs, **self.calibration.describe()}

    def calibrate(self, backbone: Any, head: Any, datamodule: Any, cache_dir: Any = None,
                  progress: bool = True) -> dict[str, Any]:
        """Choose the knob on the validation split (never the test split) and set it; the result (chosen value,
        validation accuracy and layers, the whole curve) is kept in :attr:`calibration_result`."""
        from raee.calibration.calibrate import calibrate_on_validation

        result = calibrate_on_validation(self, backbone, head, datamodule, cache_dir=cache_dir, progress=progress)
        self.set_knob(result["value"])
        self.calibration_result = result
        if not result["met"]:
            warnings.warn(f"{type(self).__name__}: no {self.knob} in the grid meets {self.calibration.describe()} on "
                          f"the validation split; using {self.knob}={result['value']:g} "
                          f"(validation accuracy {result['validation']['accuracy']:.4f}, full model "
                          f"{result['validation']['full_accuracy']:.4f})", stacklevel=2)
        return result
