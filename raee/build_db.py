"""Build the RAEE exit database: ``python -m raee.build_db`` (same config groups as raee.run).

Runs the backbone with its head once over the training split (or ``db.fraction`` of it) and
writes keys, per-layer predictions and the index to ``db.dir`` (default: the cache directory
that ``exit=raee`` looks in, so a following ``python -m raee.run exit=raee`` picks it up).
Memory stays bounded whatever the size: rows are written shard by shard (see raee.database).

``db.append=<file>`` adds the labelled examples of a CSV/TSV/JSON/JSONL/Parquet file (columns
``data.text_column`` and ``data.label_column``, labels among the data's classes) to the database
in ``db.dir``: new shards, the stored index extended, nothing recomputed for the old rows.

    python -m raee.build_db db.dir=dbs/bbc
    python -m raee.build_db db.dir=dbs/bbc db.append=/data/new_articles.csv
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from raee.cli import user_errors
from raee.errors import MissingFileError, UserError
from raee.run import CONF_DIR


def build(cfg: DictConfig) -> str:
    from hydra.utils import instantiate

    from raee.exits.raee_exit import RaeeExit
    from raee.experiment import prepare_head

    backbone = instantiate(cfg.backbone)
    head = instantiate(cfg.head)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    prepare_head(backbone, head, datamodule, cache_dir=cfg.paths.cache_dir)
    key_encoder = instantiate(cfg.key_encoder)
    if cfg.db.get("append"):
        return append(cfg, backbone, head, key_encoder, datamodule)
    # the same locate-build-save path that exit=raee uses, forced to build
    raee = RaeeExit(key_encoder, instantiate(cfg.retriever), instantiate(cfg.aggregator), database=cfg.db.dir,
                    fraction=cfg.db.fraction, seed=cfg.db.seed, rebuild=True, keep_keys=cfg.db.keep_keys,
                    tolerance=cfg.regression_tolerance)
    raee.fit(backbone, head, datamodule, cache_dir=cfg.paths.cache_dir)
    report(raee.db, backbone)
    return str(raee.db.meta["path"])


def append(cfg: DictConfig, backbone: Any, head: Any, key_encoder: Any, datamodule: Any) -> str:
    """db.append=<file>: add that file's examples to the database in db.dir."""
    from torch.utils.data import DataLoader

    from raee.data.dataset import collate_batch
    from raee.database import append_database
    from raee.database.exit_db import read_meta
    from raee.database.store import file_sha256

    if not cfg.db.dir:
        raise UserError("db.append adds examples to an existing database: name it with db.dir=<directory> (the "
                        "automatic cache entry is keyed by its training data and is never extended)")
    directory = Path(cfg.db.dir)
    meta = read_meta(directory)
    if meta.get("label_names") and list(meta["label_names"]) != list(datamodule.label_names):
        raise UserError(f"exit database {directory} was built for the classes {meta['label_names']}, the data "
                        f"config has {list(datamodule.label_names)}: use the data config the database was built with")
    path = Path(str(cfg.db.append)).expanduser()
    dataset = examples_from_file(path, datamodule)
    batches = DataLoader(dataset, batch_size=datamodule.batch_size, collate_fn=collate_batch)
    source = {"file": str(path.resolve()), "sha256": file_sha256(path), "examples": len(dataset)}
    db = append_database(directory, backbone, head, key_encoder, batches, source=source)
    print(f"appended {len(dataset)} examples from {path} ({db.size - meta['count']} rows added)")
    report(db, backbone)
    return str(db.meta["path"])


def examples_from_file(path: Path, datamodule: Any) -> Any:
    """The labelled examples of one local file, read with the data config's columns and classes."""
    from raee.data.dataset import TextDataset
    from raee.data.labels import encode_labels
    from raee.data.sources import READERS, read_table, select_columns

    if not path.is_file():
        raise MissingFileError(f"db.append={str(path)!r} is not a file: give a {'/'.join(sorted(READERS))} file of "
                               "labelled examples (columns data.text_column and data.label_column) to add to the "
                               "database in db.dir")
    options = getattr(datamodule, "options", {})
    text_column, label_column = options.get("text_column", "text"), options.get("label_column", "label")
    pair_column = options.get("text_pair_column")
    task_type = getattr(datamodule, "task_type", "classification")
    frame = select_columns(read_table(path, "append"), text_column, label_column, pair_column,
                           where=f"db.append={str(path)!r}")
    labels, names = encode_labels({"append": frame}, task_type, label_names=datamodule.label_names,
                                  origin=f"db.append={str(path)!r}")
    pairs = frame["text_pair"].tolist() if "text_pair" in frame.columns else None
    return TextDataset(frame["text"].tolist(), labels["append"], pairs, names, task_type, name=path.stem)


def report(db: Any, backbone: Any) -> None:
    kept = "kept" if db.keys is not None else "not kept"
    # (reads the whole correctness table: skipped for very large databases)
    share = f", {db.info.correct.bool().any(1).float().mean():.1%} have a correct layer" if db.size <= 10**6 else ""
    print(f"exit database: {db.size} examples in {len(db.meta['shards'])} shard(s), {backbone.num_layers + 1} "
          f"layers, key dim {db.key_dim} (keys {kept}){share} -> {db.meta['path']}")


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from raee.logs import quiet_console

    with user_errors(cfg.get("log_level")):  # a user's error: one paragraph, exit status 2
        quiet_console(cfg.get("log_level", "WARNING"))
        build(cfg)


if __name__ == "__main__":
    main()
