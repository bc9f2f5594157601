"""RAEE as a retrieval + confidence hybrid: retrieve once, then decide layer by layer.

At the key layer (``key_encoder.layer``, 0 = embeddings) every example's k neighbours are retrieved
from the exit database, once. From then on, after each layer l the head's output is looked at and the
rule (a :class:`~raee.aggregation.LayerRule`, e.g. the neighbours' label vote for the layer's prediction)
estimates the chance that the prediction at l is right; the example leaves at the first layer where
that estimate reaches the rule's threshold (else at L). Later layers never run for it.

Unlike :class:`~raee.exits.RaeeExit`, which plans from the neighbours alone, this needs the head at
every layer from the key layer on (as entropy and patience do); the retrieval happens once per example.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from raee.aggregation.base import LayerRule, gather_neighbours
from raee.backbones.base import LayerState, LayerwiseBackbone
from raee.errors import UserError
from raee.exits.base import BatchContext, DynamicExit
from raee.exits.raee_exit import RetrievalExit, add_time


class RaeeDynamicExit(RetrievalExit, DynamicExit):
    name = "raee_dynamic"

    def __init__(self, key_encoder: Any, retriever: Any, aggregator: Any, k: int = 12, min_layer: int | None = None,
                 database: str | None = None, fraction: float = 1.0, seed: int = 42, rebuild: bool = False,
                 keep_keys: bool | str = "auto", **calibration: Any) -> None:
        if not isinstance(aggregator, LayerRule):
            raise UserError(f"exit=raee_dynamic needs a per-layer rule (aggregator=neighbour_vote or vote_posterior), "
                            f"got {type(aggregator).__name__}, which plans from the neighbours alone: use it with "
                            "exit=raee")
        super().__init__(key_encoder, retriever, aggregator, k=k, database=database, fraction=fraction, seed=seed,
                         rebuild=rebuild, keep_keys=keep_keys, **calibration)
        # no decision before the neighbours are known
        self.min_layer = self.plan_layer if min_layer is None else int(min_layer)
        self.num_classes: int | None = None  # the head's, set by fit/prepare
        self._summary: torch.Tensor | None = None  # (B, ...) the rule's summary of each example's neighbours

    def validate(self, num_layers: int) -> None:
        super().validate(num_layers)
        if self.min_layer < self.plan_layer:
            raise UserError(f"exit.min_layer={self.min_layer} is below key_encoder.layer={self.plan_layer}: the "
                            "rule needs the neighbours, which are retrieved at the key layer; use exit.min_layer="
                            f"{self.plan_layer} or null")

    def knobs(self) -> dict[str, Any]:
        return {**super().knobs(), "min_layer": self.min_layer}

    def fit(self, backbone: LayerwiseBackbone, head: Any, datamodule: Any, cache_dir: Any = None,
            progress: bool = True) -> None:
        self.num_classes = head.num_classes  # calibration (inside fit) summarises neighbours per class
        super().fit(backbone, head, datamodule, cache_dir=cache_dir, progress=progress)

    def prepare(self, backbone: LayerwiseBackbone, head: Any) -> None:
        self.num_classes = head.num_classes
        super().prepare(backbone, head)

    # ------------------------------------------------------------------ per batch
    def begin(self, ctx: BatchContext) -> None:
        self._summary = None

    def remember_neighbours(self, distances: torch.Tensor, ids: torch.Tensor) -> None:
        """The neighbours (B, k) of every example of the batch, summarised once by the rule (the replay of
        :mod:`raee.calibration.simulate` hands over stored ones). Row i of the summary is batch position i."""
        if self.num_classes is None:
            raise RuntimeError("raee_dynamic does not know the number of classes: call fit() or prepare() first")
        self._summary = self.aggregator.summarize(gather_neighbours(distances, ids, self.db.info), self.num_classes)

    def observe(self, state: LayerState, active: torch.Tensor, ctx: BatchContext) -> None:
        if state.layer != self.plan_layer:
            return
        if len(active) != ctx.batch_size:  # validate() keeps min_layer >= the key layer: nobody left before it
            raise RuntimeError(f"raee_dynamic retrieves at layer {self.plan_layer} for the whole batch, but "
                               f"{ctx.batch_size - len(active)} examples left before it")
        distances, ids = self.neighbours(state, ctx.texts, ctx.timings)
        start = time.perf_counter()
        self.remember_neighbours(distances, ids)
        add_time(ctx.timings, "retrieval_aggregate", time.perf_counter() - start)

    def should_exit(self, layer: int, logits: torch.Tensor, active: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        if self._summary is None:
            raise RuntimeError("raee_dynamic decided before retrieving: the exit loop must call observe() at the "
                               "key layer first")
        start = time.perf_counter()
        # the rows of the examples still running (all of them: no indexing, which at batch 1 costs as much)
        summary = self._summary if len(active) == len(self._summary) else self._summary[active.cpu()]
        leaving = self.aggregator.estimate(layer, logits.cpu(), summary) >= self.aggregator.threshold
        add_time(ctx.timings, "retrieval_aggregate", time.perf_counter() - start)
        return leaving.to(logits.device)
