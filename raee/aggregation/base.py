"""Aggregation rules: neighbours' exit information -> a distribution over layers -> an exit layer.

Two kinds: an :class:`Aggregator` plans every exit once, from the neighbours alone (exit=raee);
a :class:`LayerRule` estimates, layer by layer, the chance that the example's own prediction there is
right, from its head output and its neighbours (exit=raee_dynamic, the retrieval + confidence hybrid).

Shapes: Q queries, k neighbours each, N database examples, L+1 layers (0 = embeddings), C classes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Union

import numpy as np
import torch

from raee.errors import UserError
from raee.retrieval.base import as_array

if TYPE_CHECKING:
    from raee.database.tables import ShardedTable

#: an exit table: a tensor, or the database's memory-mapped table (indexing rows gives a tensor)
Table = Union[torch.Tensor, "ShardedTable"]


@dataclass
class ExitInfo:
    """Exit information of the N database examples (L+1 layers, 0 = embeddings).

    Each table is a tensor or, for a database opened from disk, a memory-mapped ShardedTable:
    ``info.correct[rows]`` is a torch tensor either way (bool / float32 / int64 as below).
    """

    preds: Table  # (N, L+1) long: predicted class at each layer (float: predicted value, regression)
    probs: Table  # (N, L+1) float: probability of that prediction (float16 on disk; regression: 1 - |error| / tolerance)
    correct: Table  # (N, L+1) bool: prediction == label (regression: |error| <= tolerance)
    labels: Table  # (N,) long (float targets for regression)

    def __post_init__(self) -> None:
        shape = tuple(self.correct.shape)
        if len(shape) != 2 or shape[1] < 1:
            raise ValueError(f"ExitInfo.correct must be (N, L+1), got shape {shape}")
        for name in ("preds", "probs"):
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"ExitInfo.{name} has shape {tuple(getattr(self, name).shape)}, "
                                 f"ExitInfo.correct has {shape}: all per-layer tables must be (N, L+1)")
        if tuple(self.labels.shape) != shape[:1]:
            raise ValueError(f"ExitInfo.labels has shape {tuple(self.labels.shape)}, expected ({shape[0]},)")

    @property
    def num_layers(self) -> int:
        """L (the tables have L+1 columns)."""
        return int(self.correct.shape[1]) - 1

    @property
    def size(self) -> int:
        """N, the number of database examples."""
        return int(self.correct.shape[0])

    def correct_share(self) -> torch.Tensor:
        """(L+1,) share of the database each layer gets right (computed once)."""
        if getattr(self, "_correct_share", None) is None:
            total = sum((part.double().sum(0) for part in self._chunks(self.correct)),
                        torch.zeros(self.num_layers + 1, dtype=torch.float64))
            self._correct_share = (total / max(self.size, 1)).float()
        return self._correct_share

    def label_array(self) -> np.ndarray:
        """(N,) int64 class ids in memory, where every query's neighbours' labels are read from.

        A memory-mapped table is read once (8 bytes per example, little beside the keys' index); an in-memory
        tensor is used as it is, never cached (it may be changed)."""
        if isinstance(self.labels, torch.Tensor):
            return self.labels.detach().cpu().long().numpy()
        if getattr(self, "_label_array", None) is None:
            parts = [part.long().numpy() for part in self._chunks(self.labels)]
            self._label_array = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return self._label_array

    def label_counts(self) -> torch.Tensor:
        """(max label + 1,) how many database examples carry each class id (computed once)."""
        if getattr(self, "_label_counts", None) is None:
            self._label_counts = torch.from_numpy(np.bincount(self.label_array()))
        return self._label_counts

    def _chunks(self, table: Table, rows: int = 1 << 20) -> Iterator[torch.Tensor]:
        """``table`` read ``rows`` rows at a time as tensors: a memory-mapped table of millions of rows is
        never read whole."""
        for start in range(0, self.size, rows):
            yield torch.as_tensor(table[start:start + rows]).cpu()


@dataclass
class Neighbours:
    """The k retrieved neighbours of Q queries, with their rows of the exit tables.

    ``correct``, ``probs`` and ``preds`` are read from the tables when a rule first asks for them: a rule that
    needs only the labels (the label vote of exit=raee_dynamic) does not pay for three (k, L+1) reads per
    query, which at batch 1 cost more than the search itself.
    """

    valid: torch.Tensor  # (Q, k) bool: a real hit (id >= 0 and finite distance)
    distances: torch.Tensor  # (Q, k) float, smaller = nearer; 0 where invalid
    labels: torch.Tensor  # (Q, k) long, -1 where invalid
    rows: torch.Tensor  # (Q, k) long: database rows of the neighbours (0 where invalid)
    info: ExitInfo

    @cached_property
    def correct(self) -> torch.Tensor:
        """(Q, k, L+1) bool, False where invalid."""
        return self.info.correct[self.rows].bool() & self.valid.unsqueeze(-1)

    @cached_property
    def probs(self) -> torch.Tensor:
        """(Q, k, L+1) float, 0 where invalid."""
        return torch.where(self.valid.unsqueeze(-1), self.info.probs[self.rows].float(),
                           torch.zeros((), device=self.valid.device))

    @cached_property
    def preds(self) -> torch.Tensor:
        """(Q, k, L+1) long, -1 where invalid."""
        return torch.where(self.valid.unsqueeze(-1), self.info.preds[self.rows].long(),
                           torch.full((), -1, dtype=torch.long, device=self.valid.device))


def gather_neighbours(distances: torch.Tensor | np.ndarray, ids: torch.Tensor | np.ndarray,
                      info: ExitInfo) -> Neighbours:
    """distances (Q, k), ids (Q, k) (-1 = no hit) -> the neighbours' exit-table rows and validity mask.

    ids beyond the database are an error (index and database differ). Only the neighbours' labels are read
    here (the per-layer rows when first used), so memory-mapped tables stay on disk. Exit tables live on
    the CPU, and this runs in numpy: at batch 1 it runs once per example, where a dozen small torch calls
    (about 5 us each with the caches cold after a layer) cost more than the work.
    """
    ids = as_array(ids, np.int64)
    distances = as_array(distances, np.float32)
    if ids.ndim != 2 or ids.shape != distances.shape:
        raise ValueError(f"distances {tuple(distances.shape)} and ids {tuple(ids.shape)} must both be (Q, k)")
    if ids.size and int(ids.max()) >= info.size:
        raise UserError(f"neighbour id {int(ids.max())} is outside the exit database ({info.size} examples): the "
                        "index and the exit tables do not match; rebuild the database with `python -m raee.build_db`")
    valid = (ids >= 0) & np.isfinite(distances)
    rows = np.maximum(ids, 0)
    labels = np.where(valid, info.label_array()[rows], -1)
    return Neighbours(valid=torch.from_numpy(valid), distances=torch.from_numpy(np.where(valid, distances, np.float32(0))),
                      labels=torch.from_numpy(labels), rows=torch.from_numpy(rows), info=info)



#: distances are floored here, so an exact duplicate (distance 0) weighs 1 and the others stay finite
EPS = 1e-6


def _nearest_weights(nb: Neighbours) -> np.ndarray:
    valid = nb.valid.numpy()
    d = np.maximum(nb.distances.numpy(), np.float32(EPS))
    nearest = np.where(valid, d, np.float32(np.inf)).min(axis=1, keepdims=True)  # inf: no valid neighbour
    return np.where(valid, nearest / d, np.float32(0))


def nearest_weights(nb: Neighbours) -> torch.Tensor:
    """(Q, k) weights min valid distance / distance_j (the nearest neighbour weighs 1, invalid ones 0)."""
    return torch.from_numpy(_nearest_weights(nb))


def label_vote(nb: Neighbours, num_classes: int, smoothing: float = 1.0) -> torch.Tensor:
    """(Q, C) the neighbours' label distribution: nearness-weighted (:func:`nearest_weights`) label counts plus
    ``smoothing`` spread evenly over the classes, normalised (uniform for a query without neighbours)."""
    return torch.from_numpy(label_vote_array(nb, num_classes, smoothing))


def label_vote_array(nb: Neighbours, num_classes: int, smoothing: float = 1.0) -> np.ndarray:
    """:func:`label_vote` as a float32 numpy array (for rules that go on in numpy)."""
    labels = nb.labels.numpy()  # -1 for invalid neighbours: they match no class
    if labels.size and int(labels.max()) >= num_classes:
        raise UserError(f"a neighbour has label {int(labels.max())}, but the head has {num_classes} classes: the exit "
                        "database was built for other data; rebuild it with `python -m raee.build_db`")
    one_hot = labels[..., None] == np.arange(num_classes)  # (Q, k, C)
    votes = np.einsum("qk,qkc->qc", _nearest_weights(nb), one_hot) + np.float32(smoothing / num_classes)
    total = votes.sum(axis=1, keepdims=True)
    share = np.full_like(votes, 1.0 / num_classes)
    np.divide(votes, total, out=share, where=total > 0)
    return share


def probability_grid(step: float = 0.025) -> list[float]:
    """Thresholds 0, step, ..., 1: the default calibration grid of rules that threshold a probability."""
    count = int(round(1.0 / step))
    return [round(i * step, 6) for i in range(count + 1)]


def argmax_earliest(scores: torch.Tensor) -> torch.Tensor:
    """(Q, L+1) -> (Q,) index of the maximum; the earliest layer on ties."""
    return scores.argmax(dim=-1)  # torch documents that the first maximal index is returned


def finish(scores: torch.Tensor, empty: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative scores (Q, L+1) -> (exit layers (Q,) long, distribution (Q, L+1) summing to 1).

    Rows in ``empty`` (Q,) bool, or whose scores sum to 0, exit at L with a one-hot distribution on L.
    """
    scores = scores.float()
    last = scores.shape[-1] - 1
    total = scores.sum(-1, keepdim=True)  # (Q, 1)
    empty = ~(total.squeeze(-1) > 0) if empty is None else empty | ~(total.squeeze(-1) > 0)
    fallback = torch.zeros_like(scores)
    fallback[:, last] = 1.0
    distribution = torch.where(empty.unsqueeze(-1), fallback, scores / total.clamp(min=torch.finfo(scores.dtype).tiny))
    layers = torch.where(empty, torch.full_like(empty, last, dtype=torch.long), argmax_earliest(scores))
    return layers, distribution


class Aggregator(ABC):
    """One rule that turns the retrieved neighbours into an exit layer per query (planned before layer 1)."""

    def grid(self, num_layers: int, num_classes: int) -> list[float]:
        """Calibration candidates for the rule's ``threshold`` (rules with one; a probability by default)."""
        return probability_grid()

    @abstractmethod
    def choose(self, distances: torch.Tensor, ids: torch.Tensor, info: ExitInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """distances (Q, k) float, smaller = nearer; ids (Q, k) long (-1 = no hit) ->
        (exit layers (Q,) long in 0..L, distribution over layers (Q, L+1) float summing to 1).
        Invalid neighbours (id -1, non-finite distance) weigh 0; with nothing to go on the exit is L."""


class LayerRule(ABC):
    """A per-layer exit rule (exit=raee_dynamic): the example leaves at the first layer where
    :meth:`estimate`, the estimated probability that its prediction there is right, reaches ``threshold``.

    The neighbours are retrieved once per example; :meth:`summarize` keeps what the rule needs of them (computed
    once), :meth:`estimate` combines it with the head's output at each layer (kept cheap: it runs every layer).
    """

    #: the knob calibration tunes
    threshold: float = 0.5

    def grid(self, num_layers: int, num_classes: int) -> list[float]:
        """Candidate thresholds for calibration."""
        return probability_grid()

    @abstractmethod
    def summarize(self, nb: Neighbours, num_classes: int) -> torch.Tensor:
        """(Q, ...) what the rule keeps of each query's neighbours (e.g. their label vote (Q, C))."""

    @abstractmethod
    def estimate(self, layer: int, logits: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
        """logits (n, C): the example's own head output at ``layer``; summary: its rows of :meth:`summarize`
        -> (n,) estimated probability that the head's prediction at ``layer`` (argmax of logits) is right."""
