"""The retriever interface (nearest-neighbour search over the exit database's keys) and helpers."""

from __future__ import annotations

import json
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raee.atomic import atomic_write_text
from raee.errors import MissingFileError, UserError

METRICS = ("ip", "l2")
META_FILE = "retriever.json"
REBUILD_HINT = "rebuild the database with `python -m raee.build_db`"


class Retriever(ABC):
    """add(keys) once, then search(queries, k) -> (scores (Q, k), ids (Q, k)); ids -1 = no hit.

    metric "ip": inner product (cosine for L2-normalised keys), higher is nearer;
    metric "l2": squared Euclidean distance, lower is nearer.
    """

    metric: str
    #: a folder where an index may keep work files while keys are added (None: a temporary one)
    workdir: Path | None = None

    def __init__(self, metric: str = "ip") -> None:
        if metric not in METRICS:
            raise UserError(f"retriever.metric='{metric}' is unknown: choose one of {METRICS}")
        self.metric = metric

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "ip"

    @property
    @abstractmethod
    def ntotal(self) -> int:
        """Number of stored keys (0 before add)."""

    @property
    @abstractmethod
    def dim(self) -> int | None:
        """Key dimension D (None before the first add)."""

    @abstractmethod
    def add(self, keys: np.ndarray) -> None:
        """Store (N, D) float32 keys; may be called shard after shard. An index that needs training
        and was not trained (:meth:`train`) is trained on the first keys it is given."""

    def train_size(self, total: int, dim: int) -> int:
        """How many keys the index wants to be trained on before ``total`` keys of dimension ``dim``
        are added (0: it needs no training). Streaming builds hand :meth:`train` a seeded sample of that size."""
        return 0

    def train(self, sample: np.ndarray, total: int) -> None:
        """Train on (S, D) sampled keys before ``total`` keys are added shard by shard (no-op by default)."""

    @abstractmethod
    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) contiguous float32 queries, 1 <= k <= ntotal -> scores (Q, k), ids (Q, k)."""

    @abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write the index into ``directory`` (atomically, file by file)."""

    @classmethod
    @abstractmethod
    def load(cls, directory: str | Path, writable: bool = False) -> "Retriever":
        """Read an index written by :meth:`save`; ``writable``: keys will be added to it (a memory-mapped
        index is then read into memory)."""

    def describe(self) -> dict[str, Any]:
        """The settings that define the index (stored in the database's metadata and compared on reuse)."""
        return {"metric": self.metric}

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) queries -> scores float32 (Q, k), ids int64 (Q, k); k is clamped to the stored count."""
        if self.ntotal == 0:
            raise ValueError("the retriever is empty: add() keys (build the exit database) before searching")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2:
            raise ValueError(f"queries must be a (Q, D) matrix, got shape {queries.shape}")
        if queries.shape[1] != self.dim:
            raise UserError(f"queries have dimension {queries.shape[1]} but the index holds {self.dim}-dimensional "
                            "keys: the key encoder differs from the one that built the database; " + REBUILD_HINT)
        k = clamp_k(k, self.ntotal)
        scores, ids = self._search(queries, k)
        return np.asarray(scores, dtype=np.float32), np.asarray(ids, dtype=np.int64)


def clamp_k(k: int, ntotal: int) -> int:
    """k limited to the number of stored keys, with a warning naming both numbers."""
    k = int(k)
    if k < 1:
        raise ValueError(f"k={k} must be at least 1")
    if k > ntotal:
        warnings.warn(f"k={k} is larger than the database ({ntotal} keys); using k={ntotal}", stacklevel=3)
        return ntotal
    return k


def to_distances(scores: torch.Tensor | np.ndarray, metric: str) -> torch.Tensor:
    """Search scores (Q, k) -> float distances (Q, k), smaller = nearer, as the aggregators expect.

    "ip": 1 - score (1 - cosine on normalised keys), clamped at 0 (rounding can push cosine above 1);
    "l2": the squared distance as is, clamped at 0 (rounding can make it slightly negative).
    Non-finite scores stay non-finite, so the aggregators treat those neighbours as invalid.
    """
    if metric not in METRICS:
        raise ValueError(f"metric='{metric}' is unknown: choose one of {METRICS}")
    scores = as_array(scores, np.float32)  # numpy: two calls per query at batch 1, not four torch ones
    return torch.from_numpy(np.maximum(np.float32(1.0) - scores if metric == "ip" else scores, np.float32(0.0)))


def as_array(values: torch.Tensor | np.ndarray, dtype: type) -> np.ndarray:
    """Search results (scores, distances, ids) from a tensor (any device) or array-like as a numpy array of
    ``dtype`` (no copy when they already are one)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def check_keys(keys: np.ndarray, dim: int | None = None) -> np.ndarray:
    """(N, D) keys as a contiguous float32 array; refuses empty, non-2-D, non-finite or wrong-width keys."""
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    if keys.ndim != 2 or keys.shape[0] == 0 or keys.shape[1] == 0:
        raise ValueError(f"keys must be a non-empty (N, D) matrix, got shape {keys.shape}")
    if dim is not None and keys.shape[1] != dim:
        raise UserError(f"keys have dimension {keys.shape[1]} but the index holds {dim}-dimensional keys")
    if not np.isfinite(keys).all():
        raise UserError("keys contain NaN or infinite values: check the key encoder's output")
    return keys


def write_meta(directory: Path, retriever: Retriever, **extra: Any) -> None:
    """retriever.json beside the index: the settings plus dim, ntotal and ``extra`` (atomic)."""
    meta = retriever.describe() | {"dim": retriever.dim, "ntotal": retriever.ntotal, **extra}
    atomic_write_text(directory / META_FILE, json.dumps(meta, indent=2))


def open_index(directory: str | Path, filename: str) -> tuple[Path, dict[str, Any]]:
    """(path of the index file, its metadata), with clear errors when either is missing."""
    directory = Path(directory)
    path = directory / filename
    if not path.exists():
        raise MissingFileError(f"index file {path} is missing: {REBUILD_HINT}")
    return path, read_meta(directory)


def read_meta(directory: Path) -> dict[str, Any]:
    """The JSON metadata a retriever wrote beside its index, with clear errors when missing or damaged."""
    path = directory / META_FILE
    if not path.exists():
        raise MissingFileError(f"index metadata {path} is missing: {REBUILD_HINT}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"index metadata {path} is not valid JSON ({err}): {REBUILD_HINT}") from err
    if not isinstance(meta, dict):
        raise UserError(f"index metadata {path} is not a JSON object: {REBUILD_HINT}")
    return meta
