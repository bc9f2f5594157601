"""An exit database opened from disk: metadata, memory-mapped exit tables, the retriever's index."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raee.aggregation.base import ExitInfo
from raee.backbones.base import LayerwiseBackbone
from raee.database import store
from raee.database.tables import ShardedTable
from raee.errors import MissingFileError, UserError
from raee.keys import KeyEncoder

#: the on-disk layout this code writes and reads (1: one exit_info.safetensors, before sharding; 2: float16
#: probabilities, which round values near 1 together; 3: their float16 complements)
FORMAT_VERSION = 3
META_FILE = "meta.json"
INDEX_DIR = "index"
#: metadata fields that must match between a database and the run that uses it (``tolerance``: None for
#: classification, the regression tolerance a regression database's "correct" was computed with)
COMPATIBILITY_FIELDS = ("num_layers", "backbone", "head", "key_encoder", "tolerance")
BUILD_HINT = "build it with `python -m raee.build_db` (or let exit=raee build it)"


@dataclass
class ExitDatabase:
    """The exit database in ``meta["path"]``: N rows of exit information and the index over their keys.

    info: ExitInfo whose tables (N, L+1) are memory-mapped :class:`ShardedTable` s (indexing rows
        returns torch tensors). ids (N,): each row's position in its source (the training split,
        or the file a shard was appended from: ``meta["shards"][i]["source"]``).
    keys: (N, D) float32 memory-mapped keys, or None when the database does not keep them.
    """

    info: ExitInfo
    ids: ShardedTable
    keys: ShardedTable | None
    meta: dict[str, Any]
    retriever: Any

    @property
    def size(self) -> int:
        return int(self.meta["count"])

    @property
    def key_dim(self) -> int:
        return int(self.meta["key_dim"])

    @property
    def directory(self) -> Path:
        return Path(self.meta["path"])

    def check_compatible(self, expected: dict[str, Any]) -> None:
        """Refuse a database built for another backbone, head, layer count, key encoder or regression tolerance."""
        built, asked = self.meta.get("tolerance"), expected.get("tolerance")
        if "tolerance" in expected and built != asked and built is not None and asked is not None:
            raise UserError(
                f"exit database {self.meta.get('path', '')} marks a regression prediction correct within tolerance "
                f"{built}, this run asks for {asked}: rebuild it with regression_tolerance={asked} (python -m "
                f"raee.build_db regression_tolerance={asked}) or run with regression_tolerance={built}")
        for field in COMPATIBILITY_FIELDS:
            if field in expected and self.meta.get(field) != expected[field]:
                raise UserError(
                    f"exit database {self.meta.get('path', '')} was built for a different {field}: "
                    f"database has {self.meta.get(field)!r}, this run has {expected[field]!r}. "
                    "Rebuild it for this setup (python -m raee.build_db with the same overrides) or point "
                    "exit.database at a matching one")

    @classmethod
    def load(cls, directory: str | Path, verify: bool | None = None) -> "ExitDatabase":
        """Open a database; its shards are checked against meta.json (sizes and row counts always, sha256
        when ``verify``; default: databases up to 256 MiB) and its index against the row count."""
        directory = Path(directory)
        meta = read_meta(directory)
        tables = store.open_tables(directory, meta, verify)
        info = ExitInfo(preds=tables["preds"], probs=tables["probs"], correct=tables["correct"],
                        labels=tables["labels"])
        retriever = retriever_class(meta["retriever"]["class"]).load(directory / INDEX_DIR)
        if retriever.ntotal != meta["count"]:
            raise store.ShardMismatch(f"exit database {directory}: its index holds {retriever.ntotal} keys, its shards "
                                      f"{meta['count']} rows; rebuild it with `python -m raee.build_db`")
        return cls(info=info, ids=tables["ids"], keys=tables.get(store.KEYS), meta=dict(meta, path=str(directory)),
                   retriever=retriever)

    def key_files(self) -> list[Path]:
        """Each shard's keys.npy, in order; a clear error when the database does not keep its keys."""
        if self.keys is None:
            raise UserError(
                f"exit database {self.meta.get('path', '')} was built without its raw keys (db.keep_keys=false, or "
                "auto with keys over the size limit), so its index cannot be rebuilt for another retriever. "
                f"Use the retriever it was built with ({self.meta['retriever']}), or rebuild it with "
                "`python -m raee.build_db retriever=<the new one>` (add db.keep_keys=true to allow later swaps)")
        return store.key_files(self.directory, self.meta["shards"])

    def with_retriever(self, retriever: Any, progress: bool = False) -> "ExitDatabase":
        """The same exit information searched by another retriever, its index rebuilt from the stored keys
        (trained on a seeded sample, filled shard by shard; nothing is written to the database)."""
        from raee.database.build import fill_index

        if retriever.ntotal:
            raise ValueError("with_retriever() needs an empty retriever; this one already holds keys")
        fill_index(retriever, self.key_files(), [r["count"] for r in self.meta["shards"]],
                   seed=int(self.meta.get("seed", 0)), progress=progress)
        meta = dict(self.meta, retriever=describe_retriever(retriever))
        return ExitDatabase(info=self.info, ids=self.ids, keys=self.keys, meta=meta, retriever=retriever)


def read_meta(directory: Path) -> dict[str, Any]:
    """meta.json of a finished database, with errors that say what to do."""
    path = directory / META_FILE
    if not path.exists():
        raise MissingFileError(f"exit database {directory} has no {META_FILE}: {BUILD_HINT}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"exit database {directory}: {META_FILE} is not valid JSON ({err}); rebuild it with "
                        "`python -m raee.build_db`") from err
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(f"exit database {directory} has format {meta.get('format', 1)}, this raee reads format "
                        f"{FORMAT_VERSION} (sharded tables): rebuild it with "
                        f"`python -m raee.build_db db.dir={directory}`")
    return meta


def describe_retriever(retriever: Any) -> dict[str, Any]:
    cls = type(retriever)
    desc = retriever.describe() if hasattr(retriever, "describe") else {}
    return dict(desc, **{"class": f"{cls.__module__}:{cls.__qualname__}"})


def retriever_class(path: str) -> Any:
    module, _, name = path.partition(":")
    if not module.startswith("raee."):
        raise UserError(f"database names retriever class {path!r}, which is not part of raee; refusing to import it")
    return getattr(importlib.import_module(module), name)


def setup_description(backbone: LayerwiseBackbone, head: Any, key_encoder: KeyEncoder,
                      tolerance: float | None = None) -> dict[str, Any]:
    """The fields a database and a run must agree on; ``tolerance`` only counts for a regression head."""
    return {"backbone": backbone.name, "num_layers": backbone.num_layers, "head": head.describe(),
            "key_encoder": key_encoder.describe(),
            "tolerance": float(tolerance) if getattr(head, "regression", False) and tolerance is not None else None}
