"""The retriever interface (nearest-neighbour search over the exit database's keys)."""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch

METRICS = ("ip", "l2")


class Retriever(ABC):
    """add(keys) once, then search(queries, k) -> (scores (Q, k), ids (Q, k)); ids -1 = no hit.

    metric "ip": inner product (cosine for L2-normalised keys), higher is nearer;
    metric "l2": squared Euclidean distance, lower is nearer.
    """

    def __init__(self, metric: str = "ip") -> None:
        if metric not in METRICS:
            raise ValueError(f"retriever.metric='{metric}' is unknown: choose one of {METRICS}")
        self.metric = metric

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "ip"

    @property
    @abstractmethod
    def ntotal(self) -> int:
        """Number of stored keys."""

    @abstractmethod
    def add(self, keys: np.ndarray) -> None:
        """Store (N, D) float32 keys (training the index first if it needs it)."""

    @abstractmethod
    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Search with 1 <= k <= ntotal."""

    @abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write the index into ``directory`` (atomically)."""

    @classmethod
    @abstractmethod
    def load(cls, directory: str | Path) -> "Retriever":
        """Read an index written by :meth:`save`."""

    def describe(self) -> dict[str, Any]:
        return {"metric": self.metric}

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) queries -> scores float32 (Q, k), ids int64 (Q, k); k is clamped to the stored count."""
        if self.ntotal == 0:
            raise ValueError("the retriever is empty: add() keys (build the exit database) before searching")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2:
            raise ValueError(f"queries must be a (Q, D) matrix, got shape {queries.shape}")
        k = clamp_k(k, self.ntotal)
        scores, ids = self._search(queries, k)
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)


def clamp_k(k: int, ntotal: int) -> int:
    if k < 1:
        raise ValueError(f"k={k} must be at least 1")
    if k > ntotal:
        warnings.warn(f"k={k} is larger than the database ({ntotal} keys); using k={ntotal}", stacklevel=3)
        return ntotal
    return k


def to_distances(scores: torch.Tensor, metric: str) -> torch.Tensor:
    """Scores -> non-negative distances, smaller = nearer: 1 - cosine for ip, as is for l2.
    Non-finite scores (FAISS pads missing hits with -inf / +inf / huge values) stay non-finite."""
    scores = scores.float()
    if metric == "ip":
        return (1.0 - scores).clamp(min=0.0)
    return scores.clamp(min=0.0)


def check_keys(keys: np.ndarray, dim: int | None = None) -> np.ndarray:
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    if keys.ndim != 2 or keys.shape[0] == 0:
        raise ValueError(f"keys must be a non-empty (N, D) matrix, got shape {keys.shape}")
    if dim is not None and keys.shape[1] != dim:
        raise ValueError(f"keys have dimension {keys.shape[1]} but the index holds {dim}-dimensional keys")
    return keys
