"""RAEE: retrieval-augmented early exit (Huang et al. 2024).

Per test example: encode a key, retrieve the k most similar training examples from the exit
database, aggregate their exit information into a distribution over layers 0..L, and run the
backbone only up to the chosen layer. Examples with different exit layers share the batch
until they leave it (the exit loop drops them). No internal classifier is trained.

:class:`RetrievalExit` holds what every retrieval strategy shares (the exit database, keys,
search); :class:`RaeeExit` plans with an aggregation rule; :mod:`raee.exits.raee_dynamic` decides
layer by layer from the same neighbours.
"""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from raee.backbones.base import LayerState, LayerwiseBackbone
from raee.calibration.target import Calibrated
from raee.errors import MissingFileError, UserError
from raee.exits.base import BatchContext, ExitStrategy, PlannedExit


class RetrievalExit(Calibrated, ExitStrategy):
    """The exit database, the search of an example's k neighbours (keys at :attr:`plan_layer`) and the
    rule (``aggregator``) that turns them into exits; calibration tunes the rule's threshold.

    tolerance: on a regression task, a layer counts as correct for a database example when its
    prediction is within ``tolerance`` of the target (stored in the database, checked on use)."""

    def __init__(self, key_encoder: Any, retriever: Any, aggregator: Any, k: int = 12, database: str | None = None,
                 fraction: float = 1.0, seed: int = 42, rebuild: bool = False, keep_keys: bool | str = "auto",
                 tolerance: float = 0.5, shard_rows: int | None = None, resume: bool | None = None,
                 **calibration: Any) -> None:
        if k < 1:
            raise UserError(f"exit.k={k} must be at least 1 (number of neighbours retrieved)")
        self.init_calibration(**calibration)
        self.key_encoder = key_encoder
        self.retriever = retriever
        self.aggregator = aggregator
        self.k = int(k)
        self.database_dir = database
        self.fraction = float(fraction)
        self.seed = int(seed)
        self.rebuild = bool(rebuild)
        # a killed build's complete shards are kept and the build goes on from there, unless rebuilding
        # (python -m raee.build_db rebuilds the database but resumes its shards unless db.rebuild=true)
        self.resume = not self.rebuild if resume is None else bool(resume)
        self.shard_rows = None if shard_rows is None else int(shard_rows)
        self.keep_keys = keep_keys
        self.tolerance = float(tolerance)
        self.plan_layer = key_encoder.plan_layer
        self.db = None
        self.key_choice: dict[str, Any] | None = None  # key_encoder.pooling=auto: what the validation split chose

    def knobs(self) -> dict[str, Any]:
        settings = {k: v for k, v in vars(self.aggregator).items() if isinstance(v, (int, float, str, bool))}
        return self.with_calibration_knobs({
            "k": self.k, "aggregator": {"rule": type(self.aggregator).__name__, **settings},
            "key_encoder": self.key_encoder.describe(),
            "retriever": {k: v for k, v in self.retriever.describe().items() if v is not None},
            "fraction": self.fraction})

    @property
    def knob(self) -> str:  # calibration tunes the rule's own knob
        return f"aggregator.{getattr(self.aggregator, 'knob', 'threshold')}"

    def default_grid(self, num_layers: int, num_classes: int) -> list[float]:
        grid = getattr(self.aggregator, "grid", None)
        return list(grid(num_layers, num_classes)) if callable(grid) else []

    def validate(self, num_layers: int) -> None:
        from raee.exits.base import check_layer

        super().validate(num_layers)
        check_layer(self.plan_layer, num_layers, "key_encoder.layer")

    # ------------------------------------------------------------------ database
    def default_database_dir(self, backbone: LayerwiseBackbone, head: Any, datamodule: Any, cache_dir: Any) -> Path:
        from raee.database import FORMAT_VERSION, setup_description
        from raee.experiment import data_description, fingerprint

        key = fingerprint(setup_description(backbone, head, self.key_encoder, self.tolerance)
                          | {"data": data_description(datamodule), "fraction": self.fraction, "seed": self.seed,
                             "keep_keys": str(self.keep_keys), "format": FORMAT_VERSION})
        return Path(cache_dir or "artifacts/cache") / "db" / key

    def database_target(self, backbone: LayerwiseBackbone, head: Any, datamodule: Any, cache_dir: Any) -> Path:
        """The database directory this strategy uses: ``database`` (db.dir) or the automatic cache entry."""
        if self.database_dir:
            return Path(self.database_dir)
        return self.default_database_dir(backbone, head, datamodule, cache_dir)

    def fit(self, backbone: LayerwiseBackbone, head: Any, datamodule: Any, cache_dir: Any = None,
            progress: bool = True) -> None:
        """Load the exit database (checking it matches this setup) or build it from the training split.

        Built at most once however many processes ask (:func:`raee.cache.load_or_build`: a file lock,
        built in a temporary directory, then renamed). A damaged automatic cache entry is rebuilt with
        a warning; a database named with ``database`` (db.dir) is never rebuilt unless ``rebuild``.
        The build works in ``<database>.parts`` beside it: a killed build resumes there, and the parts of
        a build in several jobs (``python -m raee.build_db -m db.part=0,1 db.parts=2``) are merged on
        first use once all are present.
        """
        from raee import database
        from raee.cache import load_or_build
        from raee.calibration.tables import load_or_compute_layer_logits

        self.key_encoder.bind(backbone, head)
        if getattr(self.key_encoder, "pooling", None) == "auto":  # chosen on validation before the database exists
            from raee.key_choice import choose_pooling

            if getattr(head, "regression", False):
                raise UserError("key_encoder.pooling=auto chooses by the neighbours' label vote, which a regression "
                                "task has not: give key_encoder.pooling=mean, text or last")
            self.key_choice = choose_pooling(self.key_encoder, backbone, head, datamodule, k=self.k,
                                             fraction=self.fraction, seed=self.seed, cache_dir=cache_dir,
                                             progress=progress)
        directory = self.database_target(backbone, head, datamodule, cache_dir)
        staging = database.staging_dir(directory)  # beside the target: survives a killed build, to be resumed
        if (self.database_dir and not self.rebuild and not (directory / "meta.json").exists()
                and database.staged_plan(staging) is None):  # parts waiting there are merged (or finished) below
            raise MissingFileError(f"exit.database={directory} does not exist: build it with `python -m raee.build_db "
                                   f"db.dir={directory}` or leave exit.database=null to build one automatically")
        expected = database.setup_description(backbone, head, self.key_encoder, self.tolerance)

        def load(path: Path) -> Any:
            db = database.ExitDatabase.load(path)
            db.check_compatible(expected)
            return db

        built = []

        def build(path: Path) -> None:
            # every layer's outputs on the training split are shared by every key setting (cached): the build
            # itself then runs the backbone only up to the key layer
            # (a fresh build only: parts staged by a killed build or by build_db's parts are resumed or merged
            # without that whole-split pass)
            fresh = database.staged_plan(staging) is None
            layer_logits = (load_or_compute_layer_logits(backbone, head, datamodule, "train", cache_dir, progress)
                            if cache_dir is not None and fresh else None)
            database.build_database(backbone, head, self.key_encoder, self.retriever, datamodule, path,
                                    fraction=self.fraction, seed=self.seed, keep_keys=self.keep_keys,
                                    shard_rows=self.shard_rows, tolerance=self.tolerance, progress=progress,
                                    staging=staging, rebuild=not self.resume, layer_logits=layer_logits)
            built.append(path)

        db = load_or_build(directory, build, load, auto=not self.database_dir, what="exit database",
                           rebuild=self.rebuild)
        if built:  # the parts are in the database now (hard links): their staging folder goes
            shutil.rmtree(staging, ignore_errors=True)
        if db.meta["retriever"] != database.describe_retriever(self.retriever):
            db = db.with_retriever(self.retriever, progress=progress)  # another index, same keys: no backbone pass
        self.use_database(db)
        if self.calibration.active:
            self.calibrate(backbone, head, datamodule, cache_dir=cache_dir, progress=progress)

    def use_database(self, db: Any) -> None:
        self.db = db
        self.retriever = db.retriever

    def prepare(self, backbone: LayerwiseBackbone, head: Any) -> None:
        super().prepare(backbone, head)
        self.key_encoder.bind(backbone, head)
        if self.db is None:
            raise RuntimeError("RAEE has no exit database: call fit() (run_experiment does) or use_database()")
        from raee.database import setup_description

        self.db.check_compatible(setup_description(backbone, head, self.key_encoder, self.tolerance))
        if self.k > self.db.size:
            warnings.warn(f"exit.k={self.k} is larger than the exit database ({self.db.size} examples); "
                          f"using k={self.db.size}", stacklevel=2)
            self.k = self.db.size

    # ------------------------------------------------------------------ retrieval
    #: whether the strategy retrieves at all in its current setting (a calibrated choice may answer without)
    retrieves: bool = True

    def calibration_overhead(self, tables: Any) -> float:
        """The keys' layer equivalents on ``tables`` (a separate encoder's FLOPs) when this setting retrieves."""
        return tables.key_layer_equivalents() if self.retrieves else 0.0

    def key_flops(self, texts: list[str]) -> float:
        """FLOPs of the keys of ``texts`` beyond the backbone's layers (a separate encoder's; 0 when the strategy
        does not retrieve). Counted outside the timed region (:mod:`raee.cost`)."""
        return float(self.key_encoder.flops(texts).sum()) if self.retrieves else 0.0

    def neighbours(self, state: LayerState, texts: list[str], timings: dict[str, float] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys of the batch at :attr:`plan_layer` -> (distances (B, k) float, smaller = nearer; ids (B, k) long,
        -1 = no hit). Adds the seconds spent to ``timings`` (retrieval_keys, retrieval_search)."""
        from raee.retrieval.base import to_distances

        start = time.perf_counter()
        keys = self.key_encoder.encode(state, texts)
        t_keys = time.perf_counter()
        scores, ids = self.retriever.search(keys.detach().cpu().numpy(), min(self.k, self.db.size))
        t_search = time.perf_counter()
        if timings is not None:
            add_time(timings, "retrieval_keys", t_keys - start)
            add_time(timings, "retrieval_search", t_search - t_keys)
        return to_distances(scores, self.retriever.metric), torch.from_numpy(ids)  # search gives int64 ids

    def retrieval_description(self) -> dict[str, Any]:
        """What the neighbours depend on (cache keys of calibration tables)."""
        from raee.database import describe_retriever

        if self.db is None:
            raise RuntimeError("no exit database yet: call fit() or use_database() first")
        return {"key_encoder": self.key_encoder.describe(), "retriever": describe_retriever(self.retriever),
                "database": self.db.meta.get("content_hash"), "k": self.k}


def add_time(timings: dict[str, float], name: str, seconds: float) -> None:
    timings[name] = timings.get(name, 0.0) + seconds


class RaeeExit(RetrievalExit, PlannedExit):
    """The paper's RAEE: an aggregation rule turns the neighbours into every example's exit layer."""

    name = "raee"
    supports_regression = True

    def __init__(self, key_encoder: Any, retriever: Any, aggregator: Any, k: int = 12, database: str | None = None,
                 fraction: float = 1.0, seed: int = 42, rebuild: bool = False, keep_keys: bool | str = "auto",
                 tolerance: float = 0.5, shard_rows: int | None = None, resume: bool | None = None,
                 **calibration: Any) -> None:
        super().__init__(key_encoder, retriever, aggregator, k=k, database=database, fraction=fraction, seed=seed,
                         rebuild=rebuild, keep_keys=keep_keys, tolerance=tolerance, shard_rows=shard_rows,
                         resume=resume, **calibration)
        self.last: dict[str, torch.Tensor] = {}  # neighbours and distribution of the last batch (notebooks)

    def validate(self, num_layers: int) -> None:
        from raee.aggregation.base import LayerRule

        super().validate(num_layers)
        if isinstance(self.aggregator, LayerRule):  # checked here, not in __init__: build_db takes any aggregator
            raise UserError(f"aggregator {type(self.aggregator).__name__} is a per-layer rule (it reads the head's "
                            "output at every layer): use it with exit=raee_dynamic")

    def decide(self, distances: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Neighbours (Q, k) -> (exit layers (Q,), distribution over layers (Q, L+1)) by the aggregation rule."""
        return self.aggregator.choose(distances, ids, self.db.info)

    # ------------------------------------------------------------------ inference
    def plan(self, state: LayerState, ctx: BatchContext) -> torch.Tensor:
        distances, ids = self.neighbours(state, ctx.texts, ctx.timings)
        start = time.perf_counter()
        layers, distribution = self.decide(distances, ids)
        add_time(ctx.timings, "retrieval_aggregate", time.perf_counter() - start)
        self.last = {"ids": ids, "distances": distances, "distribution": distribution, "layers": layers}
        return layers.to(state.hidden.device)
