"""Replay an exit strategy on precomputed tables (:mod:`raee.calibration.tables`): no backbone runs.

The strategy's own decision code runs on the tables, exactly as the exit loop would call it:

- a retrieval planner (:class:`~raee.exits.RaeeExit`): ``decide(distances, ids)`` on the stored neighbours;
- a :class:`~raee.exits.DynamicExit`: ``begin``, then ``should_exit(layer, logits, active, ctx)`` layer by
  layer on the examples still running (retrieval ones get the stored neighbours first).

Labels are never passed to the strategy (the context has none): only the scoring reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from raee.calibration.tables import SplitTables
from raee.exits.base import BatchContext, DynamicExit, PlannedExit


@dataclass
class SimulatedRun:
    exit_layers: torch.Tensor  # (N,) long
    layers_computed: torch.Tensor  # (N,) long: backbone layers run (planning layer included)
    predictions: torch.Tensor  # (N,) long: the head's prediction at the exit layer

    def scores(self, labels: torch.Tensor) -> dict[str, float]:
        """accuracy, mean_exit_layer, mean_layers_computed."""
        return {"accuracy": float((self.predictions == labels).float().mean()),
                "mean_exit_layer": float(self.exit_layers.float().mean()),
                "mean_layers_computed": float(self.layers_computed.float().mean())}


def simulate(strategy: Any, tables: SplitTables) -> SimulatedRun:
    """The exits ``strategy`` takes on the examples of ``tables``."""
    L, n = tables.num_layers, tables.size
    if isinstance(strategy, PlannedExit):
        if not callable(getattr(strategy, "decide", None)):
            raise TypeError(f"{type(strategy).__name__} plans from hidden states; only retrieval planners "
                            "(with decide(distances, ids)) can be replayed on tables")
        _need_neighbours(strategy, tables)
        layers, _ = strategy.decide(tables.distances, tables.ids)
        layers = layers.long().cpu().clamp(0, L)
        computed = layers.clamp(min=strategy.plan_layer)
        predictions = tables.logits[torch.arange(n), layers].argmax(-1)
    elif isinstance(strategy, DynamicExit):
        layers, predictions = _replay_dynamic(strategy, tables)
        computed = layers.clone()
    else:
        raise TypeError(f"cannot replay {type(strategy).__name__}: it is neither a PlannedExit nor a DynamicExit")
    return SimulatedRun(exit_layers=layers, layers_computed=computed, predictions=predictions)


def _need_neighbours(strategy: Any, tables: SplitTables) -> None:
    if not tables.has_neighbours:
        raise ValueError(f"{type(strategy).__name__} needs neighbours, but the tables were built without retrieval")


def _replay_dynamic(strategy: DynamicExit, tables: SplitTables) -> tuple[torch.Tensor, torch.Tensor]:
    """The dynamic branch of :func:`raee.exit_loop.run_early_exit`, on stored logits: (exit layers (N,),
    predictions (N,), the argmax of what the strategy answers with at each exit, :meth:`DynamicExit.answer`)."""
    L, n = tables.num_layers, tables.size
    ctx = BatchContext(num_layers=L, batch_size=n, texts=[""] * n)
    strategy.begin(ctx)
    if callable(getattr(strategy, "remember_neighbours", None)):
        _need_neighbours(strategy, tables)
        strategy.remember_neighbours(tables.distances, tables.ids)
    exit_layers = torch.full((n,), L, dtype=torch.long)
    predictions = torch.zeros(n, dtype=torch.long)
    active = torch.arange(n)
    for layer in range(strategy.min_layer, L + 1):
        logits = tables.logits[active, layer]
        leaving = strategy.should_exit(layer, logits, active, ctx).cpu() | (layer == L)
        if bool(leaving.any()):
            predictions[active[leaving]] = strategy.answer(layer, logits, active, ctx).cpu()[leaving].argmax(-1)
        exit_layers[active[leaving]] = layer
        active = active[~leaving]
        if not len(active):
            break
    return exit_layers, predictions
