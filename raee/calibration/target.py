"""Calibration targets: what a user asks of an exit strategy, and the choice of its settings on validation.

Cost is the mean backbone layers computed per example plus, for a strategy that retrieves, its keys' cost in
layer equivalents (a separate key encoder's FLOPs over one backbone layer's; :mod:`raee.cost`).

``target=accuracy, max_drop=d, gain_per_layer=g, gain_confidence=c``: among the settings whose validation
accuracy is at least the full model's validation accuracy minus ``d``, start from the fastest (ties: the more
accurate, then the earlier candidate) and take one more step while a costlier qualifying setting gains more: at
least ``g`` accuracy per layer equivalent it adds (default 0.01, one point per layer), by a margin that is real
at one-sided confidence ``c`` (default 0.95) in a paired test on the validation examples (McNemar's, normal
approximation: (b - c) / sqrt(b + c) with b, c the examples only one of the two gets right). Of those, the
step goes to the one with the highest accuracy - g x cost. The paired test guards against the winner's curse:
among hundreds of candidates some beat a simple one on validation by chance. ``gain_per_layer=null``: strictly
the fastest; ``gain_confidence=null``: no test. When no setting qualifies, the most accurate one (warned).

``target=budget, max_cost=c``: the most accurate setting whose cost is at most ``c`` layer equivalents (keys
included); ties go to the cheaper, then to the earlier candidate. When none qualifies, the cheapest (warned).

``target=mean_layer, max_layer=m``: the same with the mean layers computed alone (keys left out).

"Layers computed" counts the layers run before planning for every example (an example planned to
exit at layer 0 with keys at layer 2 still cost 2 layers); for dynamic strategies it is the exit layer.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from raee.errors import UserError

TARGETS = ("accuracy", "mean_layer", "budget")
#: accuracy a setting must gain per layer equivalent it adds to be preferred to a cheaper one (target=accuracy)
GAIN_PER_LAYER = 0.01
#: one-sided confidence that a costlier setting's gain on validation is real (target=accuracy)
GAIN_CONFIDENCE = 0.95


@dataclass(frozen=True)
class CalibrationTarget:
    target: str | None = None  # None: use the knob as configured
    max_drop: float = 0.0  # target=accuracy: allowed validation accuracy drop below the full model's
    max_layer: float | None = None  # target=mean_layer: the most mean layers computed allowed
    grid: tuple[float, ...] | None = None  # candidate knob values (None: the strategy's default grid)
    max_cost: float | None = None  # target=budget: the most layer equivalents (keys included) allowed
    gain_per_layer: float | None = GAIN_PER_LAYER  # target=accuracy: accuracy per added layer equivalent worth paying
    gain_confidence: float | None = GAIN_CONFIDENCE  # target=accuracy: confidence that a step's gain is real

    def __post_init__(self) -> None:
        if self.target is not None and self.target not in TARGETS:
            raise UserError(f"exit.target={self.target!r} is unknown: use accuracy (with exit.max_drop), budget (with "
                            "exit.max_cost), mean_layer (with exit.max_layer) or null (no calibration)")
        if not (math.isfinite(float(self.max_drop)) and float(self.max_drop) >= 0):
            raise UserError(f"exit.max_drop={self.max_drop} must be a finite number >= 0 (accuracy points as a "
                            "fraction, e.g. 0.01 = one point below the full model)")
        if self.target == "mean_layer" and (self.max_layer is None or not float(self.max_layer) >= 0):
            raise UserError(f"exit.target=mean_layer needs exit.max_layer >= 0 (the mean layers allowed), got "
                            f"{self.max_layer}")
        if self.target == "budget" and (self.max_cost is None or not float(self.max_cost) >= 0):
            raise UserError(f"exit.target=budget needs exit.max_cost >= 0 (the mean cost allowed, in backbone layer "
                            f"equivalents with the keys included), got {self.max_cost}")
        if self.gain_per_layer is not None and not float(self.gain_per_layer) >= 0:
            raise UserError(f"exit.gain_per_layer={self.gain_per_layer} must be >= 0 (accuracy per added layer "
                            "equivalent, e.g. 0.01) or null (strictly the fastest setting)")
        if self.gain_confidence is not None and not 0.5 <= float(self.gain_confidence) < 1.0:
            raise UserError(f"exit.gain_confidence={self.gain_confidence} must be in [0.5, 1) (one-sided confidence "
                            "that a costlier setting's gain on validation is real) or null (no test)")
        if self.grid is not None and len(self.grid) == 0:
            raise UserError("exit.grid is empty: give the candidate knob values or null for the default grid")

    @property
    def active(self) -> bool:
        return self.target is not None

    def describe(self) -> dict[str, Any]:
        if self.target == "accuracy":
            gain = None if self.gain_per_layer is None else float(self.gain_per_layer)
            confidence = None if self.gain_confidence is None else float(self.gain_confidence)
            return {"target": "accuracy", "max_drop": float(self.max_drop), "gain_per_layer": gain,
                    "gain_confidence": confidence}
        if self.target == "mean_layer":
            return {"target": "mean_layer", "max_layer": float(self.max_layer)}
        if self.target == "budget":
            return {"target": "budget", "max_cost": float(self.max_cost)}
        return {}


def paired_z(better: Any, worse: Any) -> float:
    """McNemar's statistic (normal approximation) that ``better`` (N,) bool right answers beat ``worse``'s on the
    same examples: (b - c) / sqrt(b + c); +inf when only ``better`` is ever right alone, 0 when they never differ."""
    b = int((better & ~worse).sum())
    c = int((worse & ~better).sum())
    return 0.0 if b + c == 0 else (math.inf if c == 0 and b > 0 else (b - c) / math.sqrt(b + c))


def _one_sided_z(confidence: float) -> float:
    return statistics.NormalDist().inv_cdf(float(confidence))


def choose_point(curve: Sequence[dict[str, Any]], target: CalibrationTarget, full_accuracy: float
                 ) -> tuple[dict[str, Any], bool]:
    """The point of ``curve`` (dicts with value, accuracy, mean_layers_computed and, optionally, cost and
    ``_correct``, the (N,) bool per-example right answers the paired test reads; in candidate order) that meets
    ``target``, and whether one met it (see the module docstring for the rule)."""
    if not curve:
        raise UserError("calibration has no candidate settings: the grid is empty; give the knob values to try "
                        "with exit.grid=[...]")
    order = list(range(len(curve)))
    acc = [float(p["accuracy"]) for p in curve]
    layers = [float(p["mean_layers_computed"]) for p in curve]
    cost = [float(p.get("cost", p["mean_layers_computed"])) for p in curve]
    tol = 1e-9  # accuracies are ratios of counts: compare without float noise
    if target.target == "accuracy":
        ok = [i for i in order if acc[i] >= full_accuracy - float(target.max_drop) - tol]
        if ok:
            here = min(ok, key=lambda i: (cost[i], -acc[i], i))  # the fastest
            gain = target.gain_per_layer
            if gain is None:
                return curve[here], True
            z = None if target.gain_confidence is None else _one_sided_z(target.gain_confidence)

            def real(j: int, i: int) -> bool:  # j's gain over i survives the paired test
                if z is None or "_correct" not in curve[j] or "_correct" not in curve[i]:
                    return True
                return paired_z(curve[j]["_correct"], curve[i]["_correct"]) >= z

            while True:  # one more step while a costlier setting gains enough, and really
                steps = [j for j in ok if cost[j] > cost[here] + tol and acc[j] > acc[here] + tol
                         and acc[j] - acc[here] >= float(gain) * (cost[j] - cost[here]) - tol and real(j, here)]
                if not steps:
                    return curve[here], True
                here = min(steps, key=lambda j: (-round(acc[j] - float(gain) * cost[j], 9), cost[j], j))
        best = min(order, key=lambda i: (-acc[i], cost[i], i))
    elif target.target in ("mean_layer", "budget"):
        spent, limit = (layers, target.max_layer) if target.target == "mean_layer" else (cost, target.max_cost)
        ok = [i for i in order if spent[i] <= float(limit) + tol]
        if ok:
            return curve[min(ok, key=lambda i: (-acc[i], spent[i], i))], True
        best = min(order, key=lambda i: (spent[i], -acc[i], i))
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
    current = getattr(obj, last)
    # a knob that may be off (None) takes the value as it is; others keep their type (a float stays a float)
    setattr(obj, last, value if value is None or current is None else type(current)(value))


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
                         grid: Sequence[float] | None = None, max_cost: float | None = None,
                         gain_per_layer: float | None = GAIN_PER_LAYER,
                         gain_confidence: float | None = GAIN_CONFIDENCE) -> None:
        self.calibration = CalibrationTarget(target=target, max_drop=float(max_drop),
                                             max_layer=None if max_layer is None else float(max_layer),
                                             grid=None if grid is None else tuple(float(v) for v in grid),
                                             max_cost=None if max_cost is None else float(max_cost),
                                             gain_per_layer=None if gain_per_layer is None else float(gain_per_layer),
                                             gain_confidence=None if gain_confidence is None else float(gain_confidence))
        self.calibration_result = None

    def default_grid(self, num_layers: int, num_classes: int) -> list[float]:
        """Candidate knob values when the config gives none (empty: the user must give exit.grid)."""
        return []

    def candidates(self, num_layers: int, num_classes: int) -> list[dict[str, Any]]:
        """The settings calibration compares, each {knob path: value}: by default the values of :attr:`knob` in
        exit.grid or :meth:`default_grid`. Strategies that tune several knobs together override it."""
        grid = list(self.calibration.grid or self.default_grid(num_layers, num_classes))
        return [{self.knob: float(value)} for value in grid]

    def calibration_overhead(self, tables: Any) -> float:
        """Layer equivalents this strategy pays beyond its layers on ``tables`` in its current setting (its keys'
        FLOPs when it retrieves; 0 by default): calibration's cost is layers computed + this."""
        return 0.0

    def get_settings(self, paths: Sequence[str]) -> dict[str, Any]:
        return {path: _get(self, path) for path in paths}

    def apply_settings(self, settings: dict[str, Any]) -> None:
        for path, value in settings.items():
            _set(self, path, value)

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
        self.apply_settings(result.get("settings") or {self.knob: result["value"]})
        self.calibration_result = result
        if not result["met"]:
            chosen = result.get("settings") or {self.knob: result["value"]}
            warnings.warn(f"{type(self).__name__}: no setting meets {self.calibration.describe()} on "
                          f"the validation split; using {chosen} "
                          f"(validation accuracy {result['validation']['accuracy']:.4f}, full model "
                          f"{result['validation']['full_accuracy']:.4f})", stacklevel=2)
        return result
