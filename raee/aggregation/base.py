"""Aggregation rules: neighbours' exit information -> a distribution over layers -> an exit layer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class ExitInfo:
    """Exit information of the N database examples (L+1 layers, 0 = embeddings)."""

    preds: torch.Tensor  # (N, L+1) long: predicted class at each layer
    probs: torch.Tensor  # (N, L+1) float: probability of that prediction
    correct: torch.Tensor  # (N, L+1) bool: prediction == label
    labels: torch.Tensor  # (N,) long

    @property
    def num_layers(self) -> int:
        return int(self.preds.shape[1]) - 1


@dataclass
class Neighbours:
    """The k retrieved neighbours of Q queries, gathered from the database."""

    valid: torch.Tensor  # (Q, k) bool: a real hit (id >= 0, finite distance)
    distances: torch.Tensor  # (Q, k) float, smaller = nearer (0 where invalid)
    correct: torch.Tensor  # (Q, k, L+1) bool, False where invalid
    probs: torch.Tensor  # (Q, k, L+1) float, 0 where invalid


def gather_neighbours(distances: torch.Tensor, ids: torch.Tensor, info: ExitInfo) -> Neighbours:
    ids = ids.long()
    distances = distances.float()
    valid = (ids >= 0) & torch.isfinite(distances)
    safe = ids.clamp(min=0)
    correct = info.correct[safe] & valid.unsqueeze(-1)
    probs = torch.where(valid.unsqueeze(-1), info.probs[safe].float(), torch.zeros(()))
    return Neighbours(valid=valid, distances=torch.where(valid, distances, torch.zeros(())), correct=correct,
                      probs=probs)


def argmax_earliest(scores: torch.Tensor) -> torch.Tensor:
    """(Q, L+1) -> (Q,) index of the maximum, the earliest layer on ties."""
    return scores.argmax(dim=-1)  # torch returns the first maximal index


def finish(scores: torch.Tensor, empty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (Q, L+1) -> (exit layers, normalised distribution); rows in ``empty`` exit at L."""
    last = scores.shape[1] - 1
    layers = torch.where(empty, torch.full_like(empty, last, dtype=torch.long), argmax_earliest(scores))
    total = scores.sum(-1, keepdim=True)
    distribution = torch.where(total > 0, scores / total.clamp(min=1e-12), torch.zeros_like(scores))
    distribution[empty] = torch.nn.functional.one_hot(torch.tensor(last), scores.shape[1]).float()
    return layers, distribution


class Aggregator(ABC):
    @abstractmethod
    def choose(self, distances: torch.Tensor, ids: torch.Tensor, info: ExitInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """distances (Q, k) smaller = nearer, ids (Q, k) (-1 = no hit) ->
        (exit layers (Q,) long, distribution over layers (Q, L+1) float summing to 1)."""
