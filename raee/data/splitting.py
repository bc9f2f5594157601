"""Seeded (stratified) splitting and subsampling of example indices.

Same seed -> same indices; a different seed -> (almost surely) different ones.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from raee.errors import UserError


def check_fraction(name: str, value: float) -> float:
    """Return ``value`` as float if it lies strictly between 0 and 1, else raise ValueError."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name}={value!r} is not a number: give a fraction strictly between 0 and 1, "
                        "e.g. 0.1") from None
    if not 0.0 < value < 1.0:
        raise UserError(f"{name}={value} is outside (0, 1): give a fraction strictly between 0 and 1, e.g. 0.1")
    return value


def _can_stratify(labels: np.ndarray, parts: int, what: str) -> bool:
    values, counts = np.unique(labels, return_counts=True)
    small = {str(v): int(c) for v, c in zip(values, counts) if c < parts}
    if small:
        warnings.warn(f"cannot stratify the {what}: classes {small} have fewer than {parts} examples "
                      f"(one per part); falling back to an unstratified random split. Add examples of those "
                      f"classes or set stratify=false to silence this.", UserWarning, stacklevel=3)
        return False
    return True


def partition(labels: Sequence[int] | np.ndarray | None, sizes: Sequence[int], seed: int, stratify: bool = True,
              what: str = "dataset") -> list[np.ndarray]:
    """Split indices 0..N-1 into consecutive parts of the given ``sizes`` (sum = N).

    labels: (N,) class ids, or None for an unstratified split.
    Returns one sorted int64 index array per part. Stratified: every class is spread evenly over
    the parts (per-class counts are within one of proportional), and part sizes are exact.
    """
    n = int(sum(sizes))
    rng = np.random.default_rng(seed)
    if labels is None or not stratify or not _can_stratify(np.asarray(labels), len(sizes), what):
        order = rng.permutation(n)
    else:
        labels = np.asarray(labels)
        if len(labels) != n:
            raise ValueError(f"partition sizes sum to {n} but there are {len(labels)} labels")
        # why: give each class's members evenly spaced keys (rank + offset) / n_class in [0, 1), in
        # random order; sorting all keys then interleaves classes, so any consecutive chunk holds
        # each class in proportion.
        keys = np.empty(n, dtype=np.float64)
        for cls in np.unique(labels):
            members = np.flatnonzero(labels == cls)
            shuffled = rng.permutation(members)
            keys[shuffled] = (np.arange(len(members)) + rng.random()) / len(members)
        order = np.lexsort((rng.random(n), keys))  # random tie-break between classes
    bounds = np.cumsum([0, *sizes])
    return [np.sort(order[bounds[i]:bounds[i + 1]]).astype(np.int64) for i in range(len(sizes))]


def fraction_size(n: int, fraction: float) -> int:
    """round(n * fraction), kept at least 1 so that a requested split is never silently empty."""
    return max(1, int(round(n * fraction)))


def subsample(n: int, labels: Sequence[int] | np.ndarray | None, max_examples: int | None, seed: int,
              stratify: bool = True, what: str = "split") -> np.ndarray | None:
    """Seeded, stratified choice of ``max_examples`` of the indices 0..n-1 (sorted).

    labels: (n,) class ids, or None (regression) for a plain random choice.
    Returns None when no subsampling is needed (max_examples is None or >= n).
    """
    if max_examples is None:
        return None
    if int(max_examples) < 1:
        raise UserError(f"max examples for the {what} is {max_examples}: give a positive number or null for all")
    if max_examples >= n:
        return None
    keep, _ = partition(labels, [int(max_examples), n - int(max_examples)], seed, stratify=stratify,
                        what=f"{what} subsample")
    return keep
