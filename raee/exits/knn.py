"""kNN: the retrieval-only baseline. Every example gets the label its neighbours in the exit database
vote for; no head is read and no backbone layer runs beyond what the keys need (with the backbone's
layer-0 keys, the embeddings only; with sentence-encoder keys, the loop's embedding step only).

It uses RAEE's key encoder, retriever and exit database (the same cached database: built once from
the training split, see :class:`~raee.exits.raee_exit.RaeeExit`), so a table with both shows what
the LM's layers add over the neighbours' labels alone. The exit layer reported is the key layer.

Vote: ``majority`` (default) counts the k neighbours' labels, ties going to the nearest neighbour's
label; ``weighted`` weighs each neighbour by softmax(-distance / temperature). The logits are the
log of the vote shares, so the reported confidence is the winning share.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from raee.backbones.base import LayerState, LayerwiseBackbone
from raee.errors import UserError
from raee.exits.base import BatchContext
from raee.exits.raee_exit import RaeeExit, add_time

VOTES = ("majority", "weighted")
#: added to the nearest neighbour's label under the majority vote: decides ties, never outvotes a neighbour
TIE_BREAK = 1e-3


class KnnExit(RaeeExit):
    name = "knn"

    def __init__(self, key_encoder: Any, retriever: Any, k: int = 12, vote: str = "majority",
                 temperature: float = 0.1, database: str | None = None, fraction: float = 1.0, seed: int = 42,
                 rebuild: bool = False, keep_keys: bool | str = "auto") -> None:
        if vote not in VOTES:
            raise UserError(f"exit.vote={vote!r} is unknown: use one of {list(VOTES)}")
        if not float(temperature) > 0:
            raise UserError(f"exit.temperature={temperature} must be > 0 (smaller = trust the nearest more)")
        super().__init__(key_encoder, retriever, aggregator=None, k=k, database=database, fraction=fraction,
                         seed=seed, rebuild=rebuild, keep_keys=keep_keys)
        self.vote = vote
        self.temperature = float(temperature)
        self.num_classes = 0

    def knobs(self) -> dict[str, Any]:
        vote = {"rule": self.vote} | ({"temperature": self.temperature} if self.vote == "weighted" else {})
        return {"k": self.k, "vote": vote, "backbone_layers_run": self.plan_layer,
                "key_encoder": self.key_encoder.describe(),
                "retriever": {k: v for k, v in self.retriever.describe().items() if v is not None},
                "fraction": self.fraction}

    def prepare(self, backbone: LayerwiseBackbone, head: Any) -> None:
        super().prepare(backbone, head)
        self.num_classes = head.num_classes
        counts = self.db.info.label_counts()
        if len(counts) > self.num_classes:
            raise UserError(f"the exit database holds label {len(counts) - 1}, but the task has "
                            f"{self.num_classes} classes: rebuild the database for this dataset")
        self.prior = torch.zeros(self.num_classes)
        self.prior[: len(counts)] = counts.float()

    def plan(self, state: LayerState, ctx: BatchContext) -> torch.Tensor:
        """Everyone stops at the key layer (the exit loop asks :meth:`own_logits` first and stops there)."""
        return torch.full((state.batch_size,), self.plan_layer, dtype=torch.long, device=state.hidden.device)

    def own_logits(self, state: LayerState, ctx: BatchContext) -> torch.Tensor:
        distances, ids = self.neighbours(state, ctx.texts, ctx.timings)
        start = time.perf_counter()
        logits = neighbour_vote(distances, ids, self.db.info.labels, self.num_classes, self.vote, self.temperature,
                                prior=self.prior)
        add_time(ctx.timings, "retrieval_vote", time.perf_counter() - start)
        self.last = {"ids": ids, "distances": distances, "logits": logits}
        return logits.to(state.hidden.device)


def neighbour_vote(distances: torch.Tensor, ids: torch.Tensor, labels: Any, num_classes: int,
                   vote: str = "majority", temperature: float = 0.1, prior: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """distances (Q, k), smaller = nearer; ids (Q, k), -1 = no hit; labels (N,) of the database (a tensor or
    a memory-mapped table: only the neighbours' rows are read) -> (Q, C) log vote shares. A query without
    a valid neighbour gets ``prior``, the database's label counts (counted from ``labels`` when not given;
    :meth:`ExitInfo.label_counts` counts a large table once)."""
    ids = torch.as_tensor(ids).long()
    distances = torch.as_tensor(distances).float()
    valid = (ids >= 0) & torch.isfinite(distances)
    neighbour_labels = torch.as_tensor(labels[ids.clamp(min=0)]).long()  # (Q, k)
    if vote == "majority":
        weights = valid.float()
        nearest = torch.where(valid, distances, torch.full_like(distances, torch.inf)).argmin(1, keepdim=True)
        weights = weights.scatter_add(1, nearest, valid.gather(1, nearest).float() * TIE_BREAK)
    else:
        scaled = torch.where(valid, -distances / temperature, torch.full_like(distances, -torch.inf))
        weights = torch.softmax(torch.where(valid.any(1, keepdim=True), scaled, torch.zeros_like(scaled)), 1)
        weights = weights * valid
    scores = torch.zeros(ids.shape[0], num_classes).scatter_add_(1, neighbour_labels, weights)
    if prior is None:
        prior = torch.bincount(torch.as_tensor(labels[:]).long(), minlength=num_classes)[:num_classes].float()
    scores = torch.where(valid.any(1, keepdim=True), scores, prior.unsqueeze(0))
    shares = scores / scores.sum(1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    return shares.clamp(min=1e-12).log()
