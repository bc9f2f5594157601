"""RAEE that is never below its own retrieval: the neighbours' vote as an answer of its own.

A retrieval-augmented exit holds two predictors: the backbone's head at the exit layer, and the label its
neighbours vote for (what ``exit=knn`` answers, with no layer run beyond the key). This strategy can answer
with either, and calibration on the validation split chooses how:

- **vote**: every example answers with its neighbours' vote at the key layer (``vote_threshold=0``; exactly
  ``exit=knn`` with the same keys, database and vote);
- **head**: the head's own confidence decides the exit (``aggregator.weight=0``: the max-probability rule);
  its threshold 2 (:data:`NEVER`) never exits early, which is the full model;
- **hybrid**: the retrieval + confidence rule of ``exit=raee_dynamic`` (head x vote^weight, ``vote_posterior``);
- **gated**: the vote answers at the key layer for the examples whose neighbours agree enough (the winning
  share of the vote >= ``vote_threshold``), and the head or the hybrid decides for the rest.

``exit.target`` picks among all of these on the validation split (:meth:`RaeeChoiceExit.candidates`; cost
counts the keys when the setting retrieves at all, :mod:`raee.calibration.target`); the test split is never read.
A setting that neither votes nor weighs the vote (the head alone) does not retrieve at inference, so it does not
pay for its keys. The paper's rule (``exit=raee``) and ``exit=raee_dynamic`` are unchanged.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from raee.backbones.base import LayerState
from raee.errors import UserError
from raee.exits.base import BatchContext
from raee.exits.knn import VOTES, neighbour_vote
from raee.exits.raee_dynamic import RaeeDynamicExit
from raee.exits.raee_exit import add_time

#: a threshold no probability reaches: the rule never exits early (the head answers at the last layer)
NEVER = 2.0
#: the answers calibration chooses among (module docstring)
FAMILIES = ("vote", "head", "hybrid", "gated")


def vote_gates(k: int, num_classes: int) -> list[float]:
    """Thresholds on the vote's winning share that let through examples with at least c of k neighbours agreeing,
    for every c above a plain plurality: (c - 0.5) / k for c = k // C + 1 .. k."""
    return [round((c - 0.5) / k, 6) for c in range(k // max(num_classes, 1) + 1, k + 1)]


class RaeeChoiceExit(RaeeDynamicExit):
    name = "raee_choice"
    #: the knobs calibration sets together (the summary's tuned_knob; reports leave them out of curve names)
    tuned_knobs = "aggregator.threshold,aggregator.weight,vote_threshold"

    def __init__(self, key_encoder: Any, retriever: Any, aggregator: Any, k: int = 12, min_layer: int | None = None,
                 vote_threshold: float | None = None, vote: str = "majority", temperature: float = 0.1,
                 families: Any = FAMILIES, database: str | None = None, fraction: float = 1.0, seed: int = 42,
                 rebuild: bool = False, keep_keys: bool | str = "auto", **calibration: Any) -> None:
        if not hasattr(aggregator, "weight"):
            raise UserError(f"exit=raee_choice weighs the neighbours' vote against the head: it needs a rule with a "
                            f"vote weight (aggregator=vote_posterior), got {type(aggregator).__name__}")
        super().__init__(key_encoder, retriever, aggregator, k=k, min_layer=min_layer, database=database,
                         fraction=fraction, seed=seed, rebuild=rebuild, keep_keys=keep_keys, **calibration)
        if vote not in VOTES:
            raise UserError(f"exit.vote={vote!r} is unknown: use one of {list(VOTES)}")
        if not float(temperature) > 0:
            raise UserError(f"exit.temperature={temperature} must be > 0 (smaller = trust the nearest more)")
        if vote_threshold is not None and not 0.0 <= float(vote_threshold) <= 1.0:
            raise UserError(f"exit.vote_threshold={vote_threshold} must be in [0, 1] (the vote's winning share; 0: "
                            "everyone answers with the vote) or null (never)")
        families = tuple(str(f) for f in families)
        unknown = [f for f in families if f not in FAMILIES]
        if unknown or not families:
            raise UserError(f"exit.families={list(families)}: choose some of {list(FAMILIES)}")
        self.vote_threshold = None if vote_threshold is None else float(vote_threshold)
        self.vote = vote
        self.temperature = float(temperature)
        self.families = families
        self.hybrid_weight = float(aggregator.weight)  # the configured weight is the hybrid's
        self.prior: torch.Tensor | None = None
        self._votes: torch.Tensor | None = None  # (B, C) log vote shares of the batch
        self._voted: torch.Tensor | None = None  # (n,) who answers with the vote at the key layer

    # ------------------------------------------------------------------ settings
    @property
    def retrieves(self) -> bool:
        return self.vote_threshold is not None or float(self.aggregator.weight) > 0

    def knobs(self) -> dict[str, Any]:
        vote = {"rule": self.vote} | ({"temperature": self.temperature} if self.vote == "weighted" else {})
        return {**super().knobs(), "vote_threshold": self.vote_threshold, "vote": vote,
                "families": ",".join(self.families)}

    def candidates(self, num_layers: int, num_classes: int) -> list[dict[str, Any]]:
        """Every setting of the families asked for (module docstring): the vote alone; the head and the hybrid at
        each threshold of the rule's grid (exit.grid overrides it) and at :data:`NEVER`; each of those behind every
        vote gate of :func:`vote_gates`."""
        taus = [*(self.calibration.grid or self.aggregator.grid(num_layers, num_classes)), NEVER]
        weights = ([0.0] if "head" in self.families else []) + (
            [self.hybrid_weight] if "hybrid" in self.families and self.hybrid_weight > 0 else [])
        out = [{"vote_threshold": 0.0, "aggregator.weight": 0.0, "aggregator.threshold": NEVER}] \
            if "vote" in self.families else []
        gates = [None] + (vote_gates(self.k, num_classes) if "gated" in self.families else [])
        out += [{"vote_threshold": gate, "aggregator.weight": weight, "aggregator.threshold": float(tau)}
                for gate in gates for weight in weights for tau in taus]
        return out

    # ------------------------------------------------------------------ per batch
    def begin(self, ctx: BatchContext) -> None:
        super().begin(ctx)
        self._votes = self._voted = None

    def remember_neighbours(self, distances: torch.Tensor, ids: torch.Tensor) -> None:
        if float(self.aggregator.weight) > 0:
            super().remember_neighbours(distances, ids)
        else:  # the head alone: the rule's summary adds nothing
            self._summary = torch.zeros(ids.shape[0], self.num_classes)
        if self.vote_threshold is not None:
            if self.prior is None:
                counts = self.db.info.label_counts()
                self.prior = torch.zeros(self.num_classes)
                self.prior[: len(counts)] = counts.float()[: self.num_classes]
            self._votes = neighbour_vote(distances, ids, self.db.info.labels, self.num_classes, self.vote,
                                         self.temperature, prior=self.prior)

    def observe(self, state: LayerState, active: torch.Tensor, ctx: BatchContext) -> None:
        if state.layer == self.plan_layer and not self.retrieves:  # no keys, no search: the head decides alone
            self._summary = torch.zeros(ctx.batch_size, self.num_classes)
            return
        super().observe(state, active, ctx)

    def should_exit(self, layer: int, logits: torch.Tensor, active: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        leaving = super().should_exit(layer, logits, active, ctx)
        self._voted = None
        if layer == self.plan_layer and self.vote_threshold is not None:
            start = time.perf_counter()
            votes = self._votes if len(active) == len(self._votes) else self._votes[active.cpu()]
            floor = math.log(self.vote_threshold) if self.vote_threshold > 0 else -math.inf
            self._voted = (votes.max(-1).values >= floor).to(leaving.device)
            leaving = leaving | self._voted
            add_time(ctx.timings, "retrieval_aggregate", time.perf_counter() - start)
        return leaving

    def answer(self, layer: int, logits: torch.Tensor, active: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        if self._voted is None:
            return logits
        votes = self._votes if len(active) == len(self._votes) else self._votes[active.cpu()]
        return torch.where(self._voted.unsqueeze(1), votes.to(logits.device), logits.float())
