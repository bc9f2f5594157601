"""Turn raw label columns (names, ids, numbers) into class ids or regression targets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from pandas.api import types as ptypes

from raee.errors import UserError


def _check_missing(labels: pd.Series, split: str, origin: str) -> None:
    missing = int(labels.isna().sum())
    if missing:
        raise UserError(f"the label column of split {split!r} ({origin}) has {missing} missing values: "
                        "drop those rows or fill in their labels")


def _integer_ids(labels: pd.Series) -> np.ndarray | None:
    """Labels as int64 if they are booleans/integers (or floats with integral values), else None."""
    if ptypes.is_bool_dtype(labels):
        return labels.astype(np.int64).to_numpy()
    if ptypes.is_integer_dtype(labels):
        return labels.to_numpy(dtype=np.int64)
    if ptypes.is_float_dtype(labels):
        values = labels.to_numpy(dtype=np.float64)
        if np.all(np.isfinite(values)) and np.all(values == np.round(values)):
            return values.astype(np.int64)
        raise UserError("the label column holds non-integer numbers: set task_type: regression for numeric "
                        "targets, or give class ids / class names for classification")
    return None


def encode_labels(frames: Mapping[str, pd.DataFrame], task_type: str = "classification",
                  label_names: Sequence[str] | None = None, known_names: Sequence[str] | None = None,
                  origin: str = "data") -> tuple[dict[str, np.ndarray], list[str]]:
    """Encode the ``label`` column of every split.

    Returns (split -> labels (N,) int64 ids or float32 targets, label_names).
    Class names: ``label_names`` if given, else ``known_names`` from the source, else the sorted
    unique names of the train split (string labels) or "0".."max" (integer labels).
    Regression: float targets and no label names.
    """
    for split, frame in frames.items():
        _check_missing(frame["label"], split, origin)
    if task_type == "regression":
        out = {}
        for split, frame in frames.items():
            try:
                out[split] = pd.to_numeric(frame["label"]).to_numpy(dtype=np.float32)
            except (TypeError, ValueError):
                raise UserError(f"task_type is regression but the labels of split {split!r} ({origin}) are not "
                                "all numbers: use numeric targets, or task_type: classification") from None
        return out, []
    if task_type != "classification":
        raise UserError(f"task_type={task_type!r} is not supported: use classification or regression")

    ids = {split: _integer_ids(frame["label"]) for split, frame in frames.items()}
    if all(v is not None for v in ids.values()):
        names = [str(n) for n in (label_names or known_names or [])]
        if not names:
            top = max(int(v.max()) for v in ids.values() if len(v))
            names = [str(i) for i in range(top + 1)]
        for split, values in ids.items():
            bad = sorted({int(v) for v in values if v < 0 or v >= len(names)})
            if bad:
                hint = (" (negative labels usually mark an unlabelled split, e.g. GLUE test sets: take the test "
                        "split from validation with hf_splits, or drop those rows)") if min(bad) < 0 else ""
                raise UserError(f"split {split!r} ({origin}) has label ids {bad[:10]} outside 0..{len(names) - 1} "
                                f"for the {len(names)} classes {names}{hint}: fix the labels or data.label_names")
        return ids, names

    # string labels (or a mix of strings and numbers): map names to ids
    as_str = {split: frame["label"].astype(str).to_numpy() for split, frame in frames.items()}
    if label_names:
        names = [str(n) for n in label_names]
    elif known_names:
        names = [str(n) for n in known_names]
    else:
        pool = as_str["train"] if "train" in as_str else np.concatenate(list(as_str.values()))
        names = sorted(set(pool.tolist()))
    if len(set(names)) != len(names):
        raise UserError(f"label_names {names} has duplicates: give each class once")
    index = {n: i for i, n in enumerate(names)}
    out = {}
    for split, values in as_str.items():
        unknown = sorted(set(values.tolist()) - index.keys())
        if unknown:
            raise UserError(f"split {split!r} ({origin}) has labels {unknown[:10]} that are not among the class "
                            f"names {names}: add them to data.label_names (or fix the data)")
        out[split] = np.array([index[v] for v in values], dtype=np.int64)
    return out, names
