"""RAEE: retrieval-augmented early exit (Huang et al. 2024).

Per test example: encode a key, retrieve the k most similar training examples from the exit
database, aggregate their exit information into a distribution over layers 0..L, and run the
backbone only up to the chosen layer. Examples with different exit layers share the batch
until they leave it (the exit loop drops them). No internal classifier is trained.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import torch

from raee.backbones.base import LayerState, LayerwiseBackbone
from raee.exits.base import BatchContext, PlannedExit


class RaeeExit(PlannedExit):
    """tolerance: on a regression task, a layer counts as correct for a database example when its
    prediction is within ``tolerance`` of the target (stored in the database, checked on use)."""

    name = "raee"
    supports_regression = True

    def __init__(self, key_encoder: Any, retriever: Any, aggregator: Any, k: int = 12, database: str | None = None,
                 fraction: float = 1.0, seed: int = 42, rebuild: bool = False, keep_keys: bool | str = "auto",
                 tolerance: float = 0.5) -> None:
        if k < 1:
            raise ValueError(f"exit.k={k} must be at least 1 (number of neighbours retrieved)")
        self.key_encoder = key_encoder
        self.retriever = retriever
        self.aggregator = aggregator
        self.k = int(k)
        self.database_dir = database
        self.fraction = float(fraction)
        self.seed = int(seed)
        self.rebuild = bool(rebuild)
        self.keep_keys = keep_keys
        self.tolerance = float(tolerance)
        self.plan_layer = key_encoder.plan_layer
        self.db = None
        self.last: dict[str, torch.Tensor] = {}  # neighbours and distribution of the last batch (notebooks)

    def knobs(self) -> dict[str, Any]:
        settings = {k: v for k, v in vars(self.aggregator).items() if isinstance(v, (int, float, str, bool))}
        return {"k": self.k, "aggregator": {"rule": type(self.aggregator).__name__, **settings},
                "key_encoder": self.key_encoder.describe(),
                "retriever": {k: v for k, v in self.retriever.describe().items() if v is not None},
                "fraction": self.fraction}

    def validate(self, num_layers: int) -> None:
        from raee.exits.base import check_layer

        check_layer(self.plan_layer, num_layers, "key_encoder.layer")

    # ------------------------------------------------------------------ database
    def default_database_dir(self, backbone: LayerwiseBackbone, head: Any, datamodule: Any, cache_dir: Any) -> Path:
        from raee.database import FORMAT_VERSION, setup_description
        from raee.experiment import data_description, fingerprint

        key = fingerprint(setup_description(backbone, head, self.key_encoder, self.tolerance)
                          | {"data": data_description(datamodule), "fraction": self.fraction, "seed": self.seed,
                             "keep_keys": str(self.keep_keys), "format": FORMAT_VERSION})
        return Path(cache_dir or "artifacts/cache") / "db" / key

    def fit(self, backbone: LayerwiseBackbone, head: Any, datamodule: Any, cache_dir: Any = None,
            progress: bool = True) -> None:
        """Load the exit database (checking it matches this setup) or build it from the training split.

        Built at most once however many processes ask (:func:`raee.cache.load_or_build`: a file lock,
        built in a temporary directory, then renamed). A damaged automatic cache entry is rebuilt with
        a warning; a database named with ``database`` (db.dir) is never rebuilt unless ``rebuild``.
        """
        from raee import database
        from raee.cache import load_or_build

        directory = Path(self.database_dir) if self.database_dir else self.default_database_dir(
            backbone, head, datamodule, cache_dir)
        if self.database_dir and not self.rebuild and not (directory / "meta.json").exists():
            raise FileNotFoundError(f"exit.database={directory} does not exist: build it with `python -m raee.build_db "
                                    f"db.dir={directory}` or leave exit.database=null to build one automatically")
        expected = database.setup_description(backbone, head, self.key_encoder, self.tolerance)

        def load(path: Path) -> Any:
            db = database.ExitDatabase.load(path)
            db.check_compatible(expected)
            return db

        def build(path: Path) -> None:
            database.build_database(backbone, head, self.key_encoder, self.retriever, datamodule, path,
                                    fraction=self.fraction, seed=self.seed, keep_keys=self.keep_keys,
                                    tolerance=self.tolerance, progress=progress)

        db = load_or_build(directory, build, load, auto=not self.database_dir, what="exit database",
                           rebuild=self.rebuild)
        if db.meta["retriever"] != database.describe_retriever(self.retriever):
            db = db.with_retriever(self.retriever, progress=progress)  # another index, same keys: no backbone pass
        self.use_database(db)

    def use_database(self, db: Any) -> None:
        self.db = db
        self.retriever = db.retriever

    def prepare(self, backbone: LayerwiseBackbone, head: Any) -> None:
        super().prepare(backbone, head)
        if self.db is None:
            raise RuntimeError("RAEE has no exit database: call fit() (run_experiment does) or use_database()")
        from raee.database import setup_description

        self.db.check_compatible(setup_description(backbone, head, self.key_encoder, self.tolerance))
        if self.k > self.db.size:
            warnings.warn(f"exit.k={self.k} is larger than the exit database ({self.db.size} examples); "
                          f"using k={self.db.size}", stacklevel=2)
            self.k = self.db.size

    # ------------------------------------------------------------------ inference
    def retrieve(self, state: LayerState, ctx: BatchContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys of the batch -> its k nearest database entries: (distances (B, k), smaller = nearer; ids (B, k),
        -1 = no hit). Key and search time are added to ``ctx.timings`` (retrieval overhead)."""
        from raee.retrieval.base import to_distances

        start = time.perf_counter()
        keys = self.key_encoder.encode(state, ctx.texts)
        t_keys = time.perf_counter()
        scores, ids = self.retriever.search(keys.detach().cpu().numpy(), self.k)
        t_search = time.perf_counter()
        add_timing(ctx, "retrieval_keys", t_keys - start)
        add_timing(ctx, "retrieval_search", t_search - t_keys)
        return to_distances(torch.as_tensor(scores), self.retriever.metric), torch.as_tensor(ids)

    def plan(self, state: LayerState, ctx: BatchContext) -> torch.Tensor:
        distances, ids = self.retrieve(state, ctx)
        start = time.perf_counter()
        layers, distribution = self.aggregator.choose(distances, ids, self.db.info)
        add_timing(ctx, "retrieval_aggregate", time.perf_counter() - start)
        self.last = {"ids": ids, "distances": distances, "distribution": distribution, "layers": layers}
        return layers.to(state.hidden.device)


def add_timing(ctx: BatchContext, name: str, seconds: float) -> None:
    """Add ``seconds`` to the batch's strategy overhead ``name`` (names starting retrieval_ count as retrieval)."""
    ctx.timings[name] = ctx.timings.get(name, 0.0) + seconds
