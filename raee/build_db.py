"""Build the RAEE exit database: ``python -m raee.build_db`` (same config groups as raee.run).

Runs the backbone with its head once over the training split (or ``db.fraction`` of it) and
writes keys, per-layer predictions and the index to ``db.dir`` (default: the cache directory
that ``exit=raee`` looks in, so a following ``python -m raee.run exit=raee`` picks it up).
Memory stays bounded whatever the size: rows are written shard by shard (see raee.database).

``db.append=<file>`` adds the labelled examples of a CSV/TSV/JSON/JSONL/Parquet file (columns
``data.text_column`` and ``data.label_column``, labels among the data's classes) to the database
in ``db.dir``: new shards, the stored index extended, nothing recomputed for the old rows.

One build in several jobs (any Hydra launcher: joblib, submitit_slurm, ray): ``db.part=p db.parts=P``
builds part p's shards in ``<db>.parts/``; ``db.merge=true`` (or ``exit=raee`` on first use) merges
them into the database. A killed build or part resumes from its complete shards; ``db.rebuild=true``
starts afresh. Progress: ``<db>.parts/progress.log`` (and the job's log file).

    python -m raee.build_db db.dir=dbs/bbc
    python -m raee.build_db db.dir=dbs/bbc db.append=/data/new_articles.csv
    python -m raee.build_db -m db.dir=dbs/bbc db.part=0,1,2,3 db.parts=4 hydra/launcher=joblib
    python -m raee.build_db db.dir=dbs/bbc db.merge=true
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

    part, parts, merge = check_part_options(cfg.db)  # before the model loads
    backbone = instantiate(cfg.backbone)
    head = instantiate(cfg.head)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    prepare_head(backbone, head, datamodule, cache_dir=cfg.paths.cache_dir)
    key_encoder = instantiate(cfg.key_encoder)
    if cfg.db.get("append"):
        return append(cfg, backbone, head, key_encoder, datamodule)
    # the same locate-build-save path that exit=raee uses, forced to build (resuming a killed build's shards
    # unless db.rebuild=true)
    raee = RaeeExit(key_encoder, instantiate(cfg.retriever), instantiate(cfg.aggregator), database=cfg.db.dir,
                    fraction=cfg.db.fraction, seed=cfg.db.seed, rebuild=True, keep_keys=cfg.db.keep_keys,
                    tolerance=cfg.regression_tolerance, shard_rows=cfg.db.get("shard_rows"),
                    resume=not cfg.db.get("rebuild", False))
    if part is not None:
        return build_part(cfg, raee, backbone, head, datamodule, part, parts)
    if merge:
        return merge_parts(cfg, raee, backbone, head, datamodule, parts)
    raee.fit(backbone, head, datamodule, cache_dir=cfg.paths.cache_dir)
    report(raee.db, backbone)
    return str(raee.db.meta["path"])


def check_part_options(db: DictConfig) -> tuple[int | None, int, bool]:
    """db.part, db.parts and db.merge, checked together."""
    part, parts, merge = db.get("part"), int(db.get("parts") or 1), bool(db.get("merge", False))
    if parts < 1:
        raise UserError(f"db.parts={parts} must be at least 1")
    if part is not None and merge:
        raise UserError("db.part builds one part and db.merge=true merges finished parts: run them as two commands "
                        "(first python -m raee.build_db -m db.part=0,...,P-1 db.parts=P, then db.merge=true)")
    if part is not None and not 0 <= int(part) < parts:
        raise UserError(f"db.part={part} must be one of 0..{parts - 1} (db.parts={parts}): e.g. python -m "
                        f"raee.build_db -m db.part={','.join(str(p) for p in range(max(parts, 2)))} "
                        f"db.parts={max(parts, 2)}")
    if part is None and parts > 1 and not merge:
        raise UserError(f"db.parts={parts} splits the build into parts run as separate jobs: add db.part, e.g. "
                        f"python -m raee.build_db -m db.part={','.join(str(p) for p in range(parts))} db.parts={parts} "
                        "(any hydra/launcher), then merge them with db.merge=true")
    return (None if part is None else int(part)), parts, merge


def build_part(cfg: DictConfig, raee: Any, backbone: Any, head: Any, datamodule: Any, part: int, parts: int) -> str:
    """db.part=p db.parts=P: compute part p's shards beside the database (resuming its complete shards)."""
    from raee import database
    from raee.database.build import regression_tolerance

    target = raee.database_target(backbone, head, datamodule, cfg.paths.cache_dir)
    staging = database.staging_dir(target)
    tolerance = regression_tolerance(head, cfg.regression_tolerance)
    shard_rows = cfg.db.get("shard_rows")
    staged = database.staged_plan(staging)
    if shard_rows is None and staged is not None and int(staged["parts"]) == parts and not cfg.db.get("rebuild"):
        shard_rows = int(staged["shard_rows"])  # the layout the other parts of this build chose
    plan, chosen = database.plan_build(backbone, head, raee.key_encoder, datamodule, fraction=cfg.db.fraction,
                                       seed=cfg.db.seed, tolerance=tolerance, shard_rows=shard_rows, parts=parts)
    result = database.build_part(backbone, head, raee.key_encoder, datamodule, staging, plan, part, chosen,
                                 tolerance=tolerance, rebuild=bool(cfg.db.get("rebuild", False)))
    shards = plan.part_shards(part)
    print(f"part {part} of {parts}: shards {shards[0]}..{shards[-1]} of {plan.shards} ({result.reused} reused, "
          f"{result.computed} computed, {result.rows_computed} examples in {result.seconds:.1f} s) -> "
          f"{result.directory}")
    done = [p.label for p in database.parts.staged_parts(staging) if p.done is not None]
    waiting = [database.parts.part_name(p, parts) for p in range(parts)
               if database.parts.part_name(p, parts) not in done]
    print(f"parts done: {', '.join(done) or 'none'}; not yet: {', '.join(waiting) or 'none'}. "
          + ("Merge them with python -m raee.build_db db.merge=true <the same overrides> (or let exit=raee merge "
             "them on first use)." if not waiting else f"Progress: {staging / database.parts.PROGRESS_LOG}"))
    return str(result.directory)


def merge_parts(cfg: DictConfig, raee: Any, backbone: Any, head: Any, datamodule: Any, parts: int) -> str:
    """db.merge=true: one database from the finished parts (no model pass), written atomically."""
    import shutil

    from raee import database
    from raee.cache import load_or_build
    from raee.database.build import regression_tolerance

    target = raee.database_target(backbone, head, datamodule, cfg.paths.cache_dir)
    staging = database.staging_dir(target)
    staged = database.staged_plan(staging)
    if staged is None and (target / "meta.json").exists():
        db = database.ExitDatabase.load(target)
        print(f"nothing to merge: no parts in {staging}, and {target} is a complete database")
        report(db, backbone)
        return str(target)
    if staged is not None and parts > 1 and int(staged["parts"]) != parts:
        raise UserError(f"{staging} holds a build in {staged['parts']} parts, this merge asks for db.parts={parts}: "
                        f"merge with db.parts={staged['parts']} (or leave db.parts out)")
    tolerance = regression_tolerance(head, cfg.regression_tolerance)
    identity = database.build_identity(backbone, head, raee.key_encoder, datamodule, fraction=cfg.db.fraction,
                                       seed=cfg.db.seed, tolerance=tolerance)

    def build_merged(directory: Path) -> None:
        database.merge_parts(staging, directory, raee.retriever, identity, keep_keys=cfg.db.keep_keys)

    db = load_or_build(target, build_merged, database.ExitDatabase.load, auto=not cfg.db.dir, what="exit database",
                       rebuild=True)
    shutil.rmtree(staging, ignore_errors=True)
    report(db, backbone)
    return str(db.meta["path"])


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
