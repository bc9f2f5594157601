"""Choose a strategy's knob on the validation split: replay every grid value, pick by the target.

Only the validation split is read (its loader and its examples); the test split is never touched,
so a calibrated run's test numbers are an honest estimate. Results are cached as JSON under
``cache_dir/calibration/<content hash>`` (the hash covers the setup, the validation data, the
strategy, its rule's and its own source code, its settings, the grid and the target); the validation tables
under ``cache_dir/tables``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Any

from raee.atomic import atomic_write_text
from raee.calibration.simulate import simulate
from raee.calibration.tables import SplitTables, load_or_compute_tables, tables_key
from raee.calibration.target import choose_point
from raee.errors import UserError

SPLIT = "validation"


def sweep_settings(strategy: Any, tables: SplitTables, candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per candidate setting ({knob path: value}): {value (the strategy's main knob), settings (when
    several knobs), accuracy, mean_exit_layer, mean_layers_computed, cost, _correct (N,) bool per example} on
    ``tables``; cost = layers computed + the strategy's overhead in that setting (its keys' layer equivalents).
    The knobs are restored afterwards."""
    paths = sorted({path for settings in candidates for path in settings})
    before = strategy.get_settings(paths)
    curve = []
    try:
        for settings in candidates:
            strategy.apply_settings(settings)
            run = simulate(strategy, tables)
            scores = run.scores(tables.labels)
            point = {"value": settings.get(strategy.knob), **({"settings": dict(settings)} if len(paths) > 1 else {}),
                     **scores, "_correct": (run.predictions == tables.labels).numpy()}  # for the paired test
            point["cost"] = scores["mean_layers_computed"] + float(strategy.calibration_overhead(tables))
            curve.append(point)
    finally:
        strategy.apply_settings(before)
    return curve


def sweep_knob(strategy: Any, tables: SplitTables, grid: list[float]) -> list[dict[str, Any]]:
    """:func:`sweep_settings` over the values of the strategy's one knob: {value, accuracy, mean_exit_layer,
    mean_layers_computed, cost} per grid value."""
    return sweep_settings(strategy, tables, [{strategy.knob: float(value)} for value in grid])


def full_model_scores(tables: SplitTables) -> dict[str, float]:
    """The full model's accuracy on ``tables`` (its prediction at layer L) and its cost (L layers)."""
    correct = tables.correct()[:, -1]
    return {"accuracy": float(correct.float().mean()), "mean_exit_layer": float(tables.num_layers),
            "mean_layers_computed": float(tables.num_layers)}


def calibrate_on_tables(strategy: Any, tables: SplitTables) -> dict[str, Any]:
    """Sweep the strategy's candidate settings on validation ``tables`` and choose by its target (no cache)."""
    candidates = strategy.candidates(tables.num_layers, int(tables.logits.shape[-1]))
    if not candidates:
        raise UserError(f"{type(strategy).__name__} has no default grid for {strategy.knob}: give exit.grid=[...]")
    curve = sweep_settings(strategy, tables, candidates)
    full = full_model_scores(tables)
    point, met = choose_point(curve, strategy.calibration, full["accuracy"])
    curve = [{k: v for k, v in p.items() if k != "_correct"} for p in curve]  # per-example answers stay here
    return {"knob": strategy.knob, "value": point["value"], **({"settings": point["settings"]} if "settings" in point
                                                              else {}),
            "met": met, **strategy.calibration.describe(), "split": SPLIT, "num_examples": tables.size,
            "validation": {"accuracy": point["accuracy"], "full_accuracy": full["accuracy"],
                           "mean_exit_layer": point["mean_exit_layer"],
                           "mean_layers_computed": point["mean_layers_computed"], "cost": point["cost"]},
            "curve": curve}


def code_fingerprint(strategy: Any) -> str:
    """Hash of the source of the strategy's classes and its rule's: editing a rule invalidates its calibrations."""
    classes = [c for c in type(strategy).__mro__ if c.__module__.startswith("raee.")]
    rule = getattr(strategy, "aggregator", None)
    classes += [c for c in type(rule).__mro__ if c.__module__.startswith("raee.")] if rule is not None else []
    h = hashlib.sha256()
    for cls in classes:
        try:
            h.update(inspect.getsource(cls).encode())
        except (OSError, TypeError):  # no source (frozen install): the class name must do
            h.update(cls.__qualname__.encode())
    return h.hexdigest()[:16]


def calibrate_on_validation(strategy: Any, backbone: Any, head: Any, datamodule: Any, cache_dir: Any = None,
                            progress: bool = True) -> dict[str, Any]:
    """:func:`calibrate_on_tables` on the validation split's tables, both cached under ``cache_dir``."""
    from raee.experiment import fingerprint

    retrieval = strategy if callable(getattr(strategy, "neighbours", None)) else None
    description = {"tables": tables_key(backbone, head, datamodule, SPLIT, retrieval),
                   "strategy": f"{type(strategy).__module__}.{type(strategy).__qualname__}",
                   "code": code_fingerprint(strategy), "knobs": strategy.knobs(), "knob": strategy.knob,
                   "grid": list(strategy.calibration.grid or []), "target": strategy.calibration.describe(),
                   "cost": "layers + keys (FLOPs)"}
    key = fingerprint(description)
    path = Path(cache_dir) / "calibration" / f"{key}.json" if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            return json.loads(path.read_text())["result"] | {"cache_key": key, "cached": True}
        except (OSError, json.JSONDecodeError, KeyError):
            pass  # damaged: calibrate again and overwrite
    tables = load_or_compute_tables(backbone, head, datamodule, SPLIT, retrieval, cache_dir, progress)
    result = calibrate_on_tables(strategy, tables)
    if path is not None:
        atomic_write_text(path, json.dumps({"description": description, "result": result}, indent=1, default=str))
    return result | {"cache_key": key, "cached": False}
