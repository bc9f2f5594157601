"""Exit-database builds in parts, resumed after a kill, merged into one database.

A build is planned before any model pass (:class:`BuildPlan`): the selected training examples, in
the order the training loader yields them, are rows 0..N-1, cut into shards of ``shard_rows``
rows; part p of P owns a contiguous range of shards. Every part works beside the target database,
in its staging directory ``<db>.parts/``::

    <db>.parts/progress.log                      one line per finished shard, from every part
               part-1-of-4/plan.json             what the rows are (setup, data, seed, ...) and the layout
                           shards/00005/*.npy    the shard files (global shard numbers)
                           shards/00005/shard.json   its record (each file's size and sha256), written last
                           part.json             written when every shard of the part is done

- A part runs whole batches of the training loader (the batches a one-process build runs) and keeps
  the rows of its shards, so its rows are those of a one-process build, bit for bit.
- Resume: a part that starts again keeps its complete shards (each checked against the sha256 in
  its shard.json) and computes the rest; ``rebuild`` starts the part afresh.
- Merge (:func:`merge_parts`): refuses a missing, incomplete, duplicated or foreign part by name,
  checks every shard against its sha256, links the shard files into the new database, trains and
  fills the index from them and writes meta.json last.

:func:`build_database` is the one-process build: part 0 of 1, then the merge.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

import raee
from raee.atomic import atomic_write_text
from raee.backbones.base import LayerwiseBackbone
from raee.database import store
from raee.database.build import (_subset, exit_rows, finish_database, regression_tolerance, resolve_keep_keys,
                                 select_fraction)
from raee.database.exit_db import FORMAT_VERSION, ExitDatabase, setup_description
from raee.errors import MissingFileError, UserError
from raee.keys import KeyEncoder

log = logging.getLogger("raee.database")

PARTS_SUFFIX = ".parts"
PLAN_FILE, PART_FILE, SHARD_FILE, PROGRESS_LOG = "plan.json", "part.json", "shard.json", "progress.log"
#: the merged database keeps the parts' progress lines here
BUILD_LOG = "build.log"
#: automatic shard size: about this many shards per build (resume granularity, balanced parts) ...
TARGET_SHARDS = 32
#: ... but at least this many rows per shard (and at most the 128 MiB memory bound of store.default_shard_rows)
MIN_SHARD_ROWS = 64
#: seconds between progress lines inside a long shard
LOG_EVERY_S = 60.0


def staging_dir(target: str | Path) -> Path:
    """Where the parts of the database ``target`` are built: ``<target>.parts`` beside it."""
    target = Path(target)
    return target.parent / f"{target.name}{PARTS_SUFFIX}"


def part_name(part: int, parts: int) -> str:
    return f"part-{part}-of-{parts}"


def auto_shard_rows(rows: int, key_dim: int, num_layers: int) -> int:
    """Rows per shard when none are asked for: about :data:`TARGET_SHARDS` shards (so that a killed build
    loses little and parts balance), at least :data:`MIN_SHARD_ROWS`, at most the memory bound."""
    return max(1, min(store.default_shard_rows(key_dim, num_layers), max(MIN_SHARD_ROWS, -(-rows // TARGET_SHARDS))))


def expected_key_dim(key_encoder: KeyEncoder, backbone: LayerwiseBackbone) -> int:
    """The keys' dimension before any is computed (for the shard size): the sentence encoder's or the
    backbone's hidden size."""
    model = getattr(key_encoder, "encoder", None) or backbone
    return int(getattr(model, "hidden_size", 0) or 4096)


def build_identity(backbone: LayerwiseBackbone, head: Any, key_encoder: KeyEncoder, datamodule: Any, *,
                   fraction: float, seed: int, tolerance: float | None) -> dict[str, Any]:
    """What a database's rows are: setup, training data, fraction and seed, and the training loader's batch
    size (batches are what the model runs). Parts of one build must agree on all of it."""
    from raee.experiment import data_description

    return {"format": FORMAT_VERSION, "setup": setup_description(backbone, head, key_encoder, tolerance),
            "data": data_description(datamodule), "fraction": float(fraction), "seed": int(seed),
            "batch_size": getattr(datamodule, "batch_size", None)}


@dataclass(frozen=True)
class BuildPlan:
    """Rows 0..rows-1 in training-loader order, in shards of ``shard_rows``, split into ``parts`` parts."""

    identity: dict[str, Any]
    rows: int
    shard_rows: int
    parts: int

    @property
    def shards(self) -> int:
        return -(-self.rows // self.shard_rows)

    def part_shards(self, part: int) -> range:
        """The shard numbers of part ``part``: a contiguous, balanced range."""
        return range(part * self.shards // self.parts, (part + 1) * self.shards // self.parts)

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Rows [start, stop) of one shard."""
        return shard * self.shard_rows, min(self.rows, (shard + 1) * self.shard_rows)

    def layout(self) -> dict[str, int]:
        return {"rows": self.rows, "shard_rows": self.shard_rows, "shards": self.shards, "parts": self.parts}

    def to_json(self, part: int) -> dict[str, Any]:
        return {"part": part, **self.layout(), "identity": self.identity}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "BuildPlan":
        return cls(identity=data["identity"], rows=int(data["rows"]), shard_rows=int(data["shard_rows"]),
                   parts=int(data["parts"]))


def make_plan(identity: dict[str, Any], rows: int, *, key_dim: int, num_layers: int, shard_rows: int | None = None,
              parts: int = 1) -> BuildPlan:
    """The plan for ``rows`` selected examples; refuses a part count that leaves a part without shards."""
    if int(parts) < 1:
        raise UserError(f"db.parts={parts} must be at least 1")
    if shard_rows is not None and int(shard_rows) < 1:
        raise UserError(f"db.shard_rows={shard_rows} must be at least 1 (or null: automatic)")
    plan = BuildPlan(identity, int(rows), int(shard_rows or auto_shard_rows(rows, key_dim, num_layers)), int(parts))
    if plan.parts > plan.shards:
        raise UserError(f"db.parts={plan.parts} is more than the {plan.shards} shard(s) of this build ({plan.rows} "
                        f"rows, {plan.shard_rows} per shard): use at most {plan.shards} parts or smaller shards "
                        f"(db.shard_rows={max(1, plan.rows // plan.parts)})")
    return plan


def differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The (dotted) fields in which two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".") or "value"]


def describe_differences(found: dict[str, Any], expected: dict[str, Any]) -> str:
    fields = differences(found, expected)
    first = fields[0]

    def pick(d: Any) -> Any:
        for key in first.split("."):
            d = d.get(key) if isinstance(d, dict) else None
        return d

    more = f" (and {len(fields) - 1} more field(s): {', '.join(fields[1:4])})" if len(fields) > 1 else ""
    return f"{first}: {pick(found)!r} there, {pick(expected)!r} here{more}"


# ---------------------------------------------------------------------------------------------- progress
class Progress:
    """Progress lines of one part in ``<staging>/progress.log`` (every part appends) and the ``raee.database``
    logger (the Hydra job's log file): shards done, examples per second, time left."""

    def __init__(self, staging: Path, plan: BuildPlan, part: int, todo_rows: int, done_shards: int) -> None:
        self.path = staging / PROGRESS_LOG
        self.plan, self.part, self.todo_rows = plan, part, todo_rows
        self.label = part_name(part, plan.parts)
        self.part_total = len(plan.part_shards(part))
        self.done_shards = done_shards
        self.rows = 0
        self.started = self.last = time.perf_counter()

    def write(self, message: str) -> None:
        line = f"{self.label} {message}"
        with open(self.path, "a") as f:  # short appends: lines of parallel parts do not interleave
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")
        log.info(line)

    def rate(self) -> str:
        elapsed = time.perf_counter() - self.started
        speed = self.rows / elapsed if elapsed > 0 else 0.0
        left = (self.todo_rows - self.rows) / speed if speed > 0 else float("nan")
        return f"{self.rows}/{self.todo_rows} examples this run, {speed:.1f} examples/s, {format_seconds(left)} left"

    def batch(self, rows: int) -> None:
        self.rows += rows
        now = time.perf_counter()
        if now - self.last >= LOG_EVERY_S:
            self.last = now
            self.write(f"working: shards {self.done_shards}/{self.part_total} of this part; {self.rate()}")

    def shard(self, name: str) -> None:
        self.done_shards += 1
        self.last = time.perf_counter()
        total = sum(1 for _ in self.path.parent.glob(f"part-*-of-{self.plan.parts}/shards/*/{SHARD_FILE}"))
        self.write(f"shard {name} done: {self.done_shards}/{self.part_total} of this part, {total}/{self.plan.shards} "
                   f"of the build; {self.rate()}")


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "unknown time"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


# ---------------------------------------------------------------------------------------------- one part
def shard_complete(directory: Path) -> bool:
    """A shard folder whose shard.json record matches its files (sizes and sha256)."""
    record_path = directory / SHARD_FILE
    if not record_path.is_file():
        return False
    try:
        record = json.loads(record_path.read_text())
        files = sorted(p.name for p in directory.iterdir() if p.suffix == ".npy")
        if files != sorted(record["files"]):
            return False
        for name, expected in record["files"].items():
            path = directory / name
            if path.stat().st_size != expected["bytes"] or store.file_sha256(path) != expected["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass
class PartResult:
    """What :func:`build_part` did: shards reused from an earlier run and computed now, rows and seconds."""

    directory: Path
    part: int
    parts: int
    reused: int
    computed: int
    rows_computed: int
    seconds: float


@torch.no_grad()
def build_part(backbone: LayerwiseBackbone, head: Any, key_encoder: KeyEncoder, datamodule: Any, staging: str | Path,
               plan: BuildPlan, part: int, chosen: np.ndarray, *, tolerance: float | None = None,
               rebuild: bool = False, progress: bool = True, layer_logits: Any = None) -> PartResult:
    """Compute the shards of part ``part`` of ``plan`` into ``staging``, keeping those already complete.

    chosen: the selected training positions (:func:`select_fraction`). One process per part at a time:
    a second one for the same part is refused (a file lock), as is a part folder built for another
    setup unless ``rebuild`` (which starts this part afresh).
    layer_logits: the training split's per-layer head outputs, computed once for every key setting
    (:func:`raee.calibration.tables.load_or_compute_layer_logits`): the pass then stops at the key layer.
    """
    if not 0 <= int(part) < plan.parts:
        raise UserError(f"db.part={part} must be one of 0..{plan.parts - 1} (db.parts={plan.parts})")
    staging = Path(staging)
    staging.mkdir(parents=True, exist_ok=True)
    directory = staging / part_name(part, plan.parts)
    lock = FileLock(str(staging / f".{directory.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"{part_name(part, plan.parts)} of the exit database build in {staging} is being built by "
                        "another process right now: each part must run once (check db.part= for a repeated part); "
                        "wait for it, or stop it and run this part again") from None
    try:
        key_encoder.bind(backbone, head)
        return _build_part_locked(backbone, head, key_encoder, datamodule, staging, directory, plan, part, chosen,
                                  tolerance, rebuild, progress, layer_logits)
    finally:
        lock.release()


def _build_part_locked(backbone: LayerwiseBackbone, head: Any, key_encoder: KeyEncoder, datamodule: Any,
                       staging: Path, directory: Path, plan: BuildPlan, part: int, chosen: np.ndarray,
                       tolerance: float | None, rebuild: bool, progress: bool, layer_logits: Any = None) -> PartResult:
    started = time.perf_counter()
    open_part(staging, directory, plan, part, rebuild)
    shards = plan.part_shards(part)
    done = complete_prefix(directory, shards)
    if done == len(shards) and read_json(directory / PART_FILE) is not None:  # finished before: nothing to do
        return PartResult(directory, part, plan.parts, reused=done, computed=0, rows_computed=0,
                          seconds=time.perf_counter() - started)
    report = Progress(staging, plan, part, todo_rows=0, done_shards=done)
    computed = 0
    if done < len(shards):
        computed = compute_shards(backbone, head, key_encoder, datamodule, directory, plan, shards[done:], chosen,
                                  tolerance, report, progress, layer_logits)
    result = PartResult(directory, part, plan.parts, reused=done, computed=computed, rows_computed=report.rows,
                        seconds=time.perf_counter() - started)
    atomic_write_text(directory / PART_FILE, json.dumps({
        "part": part, "parts": plan.parts, "shards": [store.shard_name(s) for s in shards],
        "seconds": result.seconds, "rows_computed": result.rows_computed, "reused_shards": done,
        "host": socket.gethostname(), "pid": os.getpid(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
    report.write(f"part done: {len(shards)} shard(s), {done} reused, {computed} computed in "
                 f"{format_seconds(result.seconds)}")
    return result


def open_part(staging: Path, directory: Path, plan: BuildPlan, part: int, rebuild: bool) -> None:
    """Make ``directory`` the folder of this part of ``plan``: refuse (or, rebuilding, delete) another build's
    parts and a folder planned otherwise; write plan.json."""
    other_builds(staging, plan, directory, remove=rebuild)
    found = read_json(directory / PLAN_FILE)
    if rebuild and directory.exists():
        shutil.rmtree(directory)
    elif found is not None and found.get("identity") != plan.identity:
        raise UserError(f"{directory} was built for another setup "
                        f"({describe_differences(found.get('identity') or {}, plan.identity)}): run with "
                        "db.rebuild=true to start it afresh, or with that part's setup")
    elif found is not None and BuildPlan.from_json(found).layout() != plan.layout():
        raise UserError(f"{directory} was planned with another layout ({found.get('rows')} rows, "
                        f"{found.get('shard_rows')} per shard), this run plans {plan.rows} rows, {plan.shard_rows} "
                        "per shard: run with the same db.shard_rows, or db.rebuild=true to start it afresh")
    elif found is None and directory.exists():
        shutil.rmtree(directory)  # died before its plan was written: nothing in it to keep
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / PLAN_FILE, json.dumps(plan.to_json(part), indent=2))


def complete_prefix(directory: Path, shards: range) -> int:
    """How many of ``shards``, from the first, are complete (sha256 checked). Shards are written in order, so
    the first incomplete one is where a killed part stopped: it and any after it are deleted (redone)."""
    done = 0
    for shard in shards:
        if not shard_complete(directory / store.SHARDS_DIR / store.shard_name(shard)):
            break
        done += 1
    if done < len(shards):
        (directory / PART_FILE).unlink(missing_ok=True)
    for shard in shards[done:]:
        path = directory / store.SHARDS_DIR / store.shard_name(shard)
        if path.exists():
            shutil.rmtree(path)
    return done


def compute_shards(backbone: LayerwiseBackbone, head: Any, key_encoder: KeyEncoder, datamodule: Any,
                   directory: Path, plan: BuildPlan, shards: range, chosen: np.ndarray, tolerance: float | None,
                   report: Progress, progress: bool, layer_logits: Any = None) -> int:
    """Compute ``shards`` (consecutive) into ``directory``, each shard's record written last; returns their count."""
    lo, hi = plan.shard_range(shards[0])[0], plan.shard_range(shards[-1])[1]
    report.todo_rows = hi - lo
    if report.done_shards:
        report.write(f"resuming: {report.done_shards} of {report.part_total} shards complete (sha256 checked), "
                     f"computing the other {len(shards)}")
    else:
        report.write(f"starting: shards {shards[0]}..{shards[-1]} of {plan.shards} (rows {lo}..{hi - 1} of "
                     f"{plan.rows})")

    def finish_shard(path: Path) -> None:
        atomic_write_text(path / SHARD_FILE, json.dumps(store.shard_record(directory, path.name)))
        report.shard(path.name)

    writer = store.ShardWriter(directory / store.SHARDS_DIR, plan.shard_rows, first_shard=shards[0],
                               source={"dataset": getattr(datamodule, "name", None), "split": "train"},
                               on_shard=finish_shard)
    for rows in tqdm(stream_rows(backbone, head, key_encoder, datamodule, chosen, lo, hi, tolerance, layer_logits),
                     desc=f"exit database {report.label}", disable=not progress, leave=False):
        writer.add(**rows)
        report.batch(len(rows["ids"]))
    written = writer.close()
    if len(written) != len(shards) or report.rows != hi - lo:
        raise UserError(f"the training loader gave {report.rows} rows for {report.label}, its plan expects "
                        f"{hi - lo}: the training data changed while the database was built")
    return len(written)


def other_builds(staging: Path, plan: BuildPlan, own: Path, remove: bool = False) -> None:
    """Refuse to start a part beside the parts of another build (another setup, layout or part count), which
    could never be merged with it; ``remove`` (db.rebuild=true) deletes them instead. Parts of this build are
    left alone: they may be running now."""
    for item in staged_parts(staging):
        if item.directory == own or item.plan is None:
            continue
        same = (item.plan.get("identity") == plan.identity
                and BuildPlan.from_json(item.plan).layout() == plan.layout())
        if same:
            continue
        if remove:
            shutil.rmtree(item.directory, ignore_errors=True)
            continue
        why = (f"built for another setup ({describe_differences(item.plan.get('identity') or {}, plan.identity)})"
               if item.plan.get("identity") != plan.identity else
               f"planned as {item.plan.get('parts')} part(s) of {item.plan.get('shard_rows')} rows per shard, this "
               f"job as {plan.parts} of {plan.shard_rows}")
        raise UserError(f"{staging} holds {item.label} of another build, {why}: finish that build with its own "
                        "settings, or start afresh with db.rebuild=true on every part (which deletes it)")


def stream_rows(backbone: LayerwiseBackbone, head: Any, key_encoder: KeyEncoder, datamodule: Any, chosen: np.ndarray,
                lo: int, hi: int, tolerance: float | None, layer_logits: Any = None) -> Iterator[dict[str, np.ndarray]]:
    """The database rows [lo, hi) (positions among the selected examples, in training-loader order), computed
    batch by batch from the loader's own batches: a batch that straddles ``lo`` or ``hi`` runs whole, as in a
    one-process build, and only its rows in range are kept."""
    chosen_t = torch.from_numpy(np.asarray(chosen))
    position = 0
    for batch in datamodule.train_dataloader():
        take = torch.isin(batch["index"], chosen_t)
        count = int(take.sum())
        start, position = position, position + count
        if count == 0 or position <= lo:
            continue
        if start >= hi:
            break
        rows = exit_rows(backbone, head, key_encoder, _subset(batch, take), tolerance, layer_logits)
        a, b = max(lo - start, 0), min(hi, position) - start
        yield {name: value[a:b] for name, value in rows.items()}


# ---------------------------------------------------------------------------------------------- merge
@dataclass
class StagedPart:
    directory: Path
    plan: dict[str, Any] | None
    done: dict[str, Any] | None

    @property
    def label(self) -> str:
        return self.directory.name


def staged_parts(staging: Path) -> list[StagedPart]:
    """Every part folder in ``staging`` with its plan and completion record (None where absent)."""
    if not staging.is_dir():
        return []
    return [StagedPart(p, read_json(p / PLAN_FILE), read_json(p / PART_FILE))
            for p in sorted(staging.iterdir()) if p.is_dir() and p.name.startswith("part-")]


def staged_plan(staging: Path) -> dict[str, Any] | None:
    """The plan of the parts in ``staging`` (the first part's), or None when nothing is staged."""
    for staged in staged_parts(staging):
        if staged.plan is not None:
            return staged.plan
    return None


def part_command(part: int | list[int], parts: int) -> str:
    which = ",".join(str(p) for p in part) if isinstance(part, list) else str(part)
    multi = "-m " if isinstance(part, list) and len(part) > 1 else ""
    return f"python -m raee.build_db {multi}db.part={which} db.parts={parts} <the same overrides>"


def check_parts(staging: Path, identity: dict[str, Any]) -> tuple[BuildPlan, list[StagedPart]]:
    """The complete parts of one build in ``staging``, in order; refuses, by name, a part built for another
    setup (foreign), parts of different plans or the same part twice (duplicated), and parts that are
    missing or incomplete, each with the command that fixes it."""
    staged = staged_parts(staging)
    if not staged:
        raise MissingFileError(f"no parts to merge in {staging}: build them first with "
                               f"{part_command([0, 1], 2)} (as many parts as you like), then merge")
    for item in staged:
        if item.plan is None:
            raise UserError(f"{item.directory} has no {PLAN_FILE}: it is no part of a raee build (or died before "
                            f"starting); delete it, or run that part again")
        if item.plan.get("identity") != identity:
            raise UserError(f"{item.label} in {staging} is a foreign part: it was built for another setup "
                            f"({describe_differences(item.plan.get('identity') or {}, identity)}). Delete "
                            f"{item.directory} and build that part with this setup, or merge with the setup it "
                            "was built for")
    layouts = {json.dumps(BuildPlan.from_json(i.plan).layout(), sort_keys=True): i for i in staged}
    if len(layouts) > 1:
        names = ", ".join(f"{i.label} ({i.plan['parts']} parts, {i.plan['shard_rows']} rows per shard)"
                          for i in layouts.values())
        raise UserError(f"{staging} holds parts of different builds of this setup: {names}. Keep the parts of one "
                        "build and delete the others (or db.rebuild=true on every part to start afresh)")
    plan = BuildPlan.from_json(staged[0].plan)
    by_part: dict[int, list[StagedPart]] = {}
    for item in staged:
        by_part.setdefault(int(item.plan["part"]), []).append(item)
    for number, items in sorted(by_part.items()):
        expected = part_name(number, plan.parts)
        if len(items) > 1 or items[0].label != expected:
            names = ", ".join(str(i.directory) for i in items)
            raise UserError(f"part {number} of {plan.parts} is duplicated: {names} "
                            f"{'all hold' if len(items) > 1 else 'holds'} it (a copied folder?); keep one folder, "
                            f"named {expected}, and delete the others")
    missing = [p for p in range(plan.parts) if p not in by_part]
    incomplete = [p for p in range(plan.parts) if p in by_part and by_part[p][0].done is None]
    if missing or incomplete:
        what = [f"part {p} of {plan.parts} is missing" for p in missing]
        for p in incomplete:
            have = sum(shard_complete(by_part[p][0].directory / store.SHARDS_DIR / store.shard_name(s))
                       for s in plan.part_shards(p))
            what.append(f"part {p} of {plan.parts} is incomplete ({have} of {len(plan.part_shards(p))} shards)")
        raise UserError(f"cannot merge the exit database parts in {staging}: {'; '.join(what)}. Build them with "
                        f"{part_command(sorted(missing + incomplete), plan.parts)} (a killed part resumes), then "
                        "merge with python -m raee.build_db db.merge=true")
    parts = [by_part[p][0] for p in range(plan.parts)]
    for item in parts:
        for shard in plan.part_shards(int(item.plan["part"])):
            path = item.directory / store.SHARDS_DIR / store.shard_name(shard)
            if not shard_complete(path):
                raise UserError(f"shard {path} does not match its sha256 record (damaged or modified since it was "
                                f"written): run {part_command(int(item.plan['part']), plan.parts)} again to "
                                "recompute it")
    return plan, parts


def merge_parts(staging: str | Path, directory: str | Path, retriever: Any, identity: dict[str, Any], *,
                keep_keys: bool | str = "auto", progress: bool = True, started: float | None = None) -> ExitDatabase:
    """One database in the empty ``directory`` from the complete parts in ``staging`` (see
    :func:`check_parts`): the shard files are linked in, the index trained on a seeded sample of
    all keys and filled shard by shard, meta.json written last. No model pass. ``started`` (a
    time.perf_counter() reading): when the build began, for meta.json's build_seconds (default: now)."""
    staging, directory = Path(staging), Path(directory)
    started = time.perf_counter() if started is None else started
    plan, parts = check_parts(staging, identity)
    if directory.exists() and any(directory.iterdir()):
        raise UserError(f"cannot merge into {directory}: it is not empty")
    names, records = [], []
    for item in parts:
        for shard in plan.part_shards(int(item.plan["part"])):
            name = store.shard_name(shard)
            for file in (item.directory / store.SHARDS_DIR / name).iterdir():
                if file.suffix == ".npy" or file.name == "source.json":
                    store.link_or_copy(file, directory / store.SHARDS_DIR / name / file.name)
            names.append(name)
            records.append(json.loads((item.directory / store.SHARDS_DIR / name / SHARD_FILE).read_text()))
    ids = np.concatenate([np.load(directory / store.SHARDS_DIR / n / "ids.npy", allow_pickle=False) for n in names])
    if len(ids) != plan.rows or len(np.unique(ids)) != len(ids):
        raise UserError(f"the parts in {staging} hold {len(ids)} rows of {len(np.unique(ids))} distinct examples, the "
                        f"plan {plan.rows}: the training loader's order differed between parts (seed its shuffle), so "
                        "they cannot be merged; rebuild them with db.rebuild=true")
    first_keys = np.load(directory / store.SHARDS_DIR / names[0] / f"{store.KEYS}.npy", mmap_mode="r",
                         allow_pickle=False)
    setup = identity["setup"]
    meta = dict(setup) | {
        "format": FORMAT_VERSION, "dataset": identity["data"].get("name"), "split": "train",
        "fraction": identity["fraction"], "seed": identity["seed"], "train_size": identity["data"].get("train_size"),
        "label_names": list(identity["data"].get("label_names") or []),
        "keep_keys": resolve_keep_keys(keep_keys, plan.rows, int(first_keys.shape[1])),
        "version": raee.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "build": {**plan.layout(), "parts_seconds": [item.done.get("seconds") for item in parts]},
    }
    if (staging / PROGRESS_LOG).exists():
        shutil.copyfile(staging / PROGRESS_LOG, directory / BUILD_LOG)
    if not meta["keep_keys"]:  # the records list the files the database keeps
        records = [dict(r, files={k: v for k, v in r["files"].items() if k != f"{store.KEYS}.npy"}) for r in records]
    return finish_database(directory, retriever, meta, names, started=started, progress=progress,
                           new_records=records)


# ---------------------------------------------------------------------------------------------- whole builds
def plan_build(backbone: LayerwiseBackbone, head: Any, key_encoder: KeyEncoder, datamodule: Any, *,
               fraction: float = 1.0, seed: int = 42, tolerance: float | None = None, shard_rows: int | None = None,
               parts: int = 1) -> tuple[BuildPlan, np.ndarray]:
    """The plan of a build and the selected training positions (no model pass)."""
    chosen = select_fraction(len(datamodule.split("train")), fraction, seed)
    identity = build_identity(backbone, head, key_encoder, datamodule, fraction=fraction, seed=seed,
                              tolerance=tolerance)
    plan = make_plan(identity, len(chosen), key_dim=expected_key_dim(key_encoder, backbone),
                     num_layers=backbone.num_layers, shard_rows=shard_rows, parts=parts)
    return plan, chosen


@torch.no_grad()
def build_database(backbone: LayerwiseBackbone, head: Any, key_encoder: KeyEncoder, retriever: Any, datamodule: Any,
                   directory: str | Path, *, fraction: float = 1.0, seed: int = 42, keep_keys: bool | str = "auto",
                   shard_rows: int | None = None, tolerance: float | None = None, progress: bool = True,
                   staging: str | Path | None = None, rebuild: bool = False, layer_logits: Any = None) -> ExitDatabase:
    """One pass of the backbone over (a fraction of) the training split into the empty ``directory``: the
    one-process build, run as part 0 of 1 in ``staging`` (default ``<directory>.parts``, removed when done)
    and merged. A build killed before the end resumes from its complete shards; ``rebuild`` starts afresh.

    When ``staging`` already holds the complete parts of a build in several parts
    (``python -m raee.build_db -m db.part=...``), they are merged instead, with no model pass.

    keep_keys: keep the raw keys (another retriever can then be built without a backbone pass), drop
        them, or "auto": keep them when they take at most 2 GiB (:data:`KEEP_KEYS_AUTO_BYTES`).
    shard_rows: rows per shard (default :func:`auto_shard_rows`: about 32 shards, at most 128 MiB each).
    tolerance: a regression head's "correct" is |prediction - target| <= tolerance (required for one;
        stored in the metadata and checked on use).
    layer_logits: the training split's per-layer head outputs (see :func:`build_part`).
    """
    started = time.perf_counter()
    tolerance = regression_tolerance(head, tolerance)
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise UserError(f"cannot build an exit database into {directory}: it is not empty (give a new directory; "
                        "python -m raee.build_db replaces an existing database atomically)")
    own_staging = staging is None
    staging = staging_dir(directory) if staging is None else Path(staging)
    identity = build_identity(backbone, head, key_encoder, datamodule, fraction=fraction, seed=seed,
                              tolerance=tolerance)
    staged = staged_plan(staging)
    if rebuild and staging.exists():
        shutil.rmtree(staging)
    elif staged is not None and int(staged.get("parts", 1)) > 1:
        db = merge_parts(staging, directory, retriever, identity, keep_keys=keep_keys, progress=progress)
        if own_staging:
            shutil.rmtree(staging, ignore_errors=True)
        return db
    elif staged is not None and staged.get("identity") != identity:
        raise UserError(f"{staging} holds part of a build for another setup "
                        f"({describe_differences(staged.get('identity') or {}, identity)}): run with db.rebuild=true "
                        f"to start afresh (or delete {staging})")
    if staged is not None and shard_rows is None and int(staged.get("parts", 1)) == 1:
        shard_rows = int(staged["shard_rows"])  # resume in the layout the killed build chose
    plan, chosen = plan_build(backbone, head, key_encoder, datamodule, fraction=fraction, seed=seed,
                              tolerance=tolerance, shard_rows=shard_rows)
    build_part(backbone, head, key_encoder, datamodule, staging, plan, 0, chosen, tolerance=tolerance,
               progress=progress, layer_logits=layer_logits)
    db = merge_parts(staging, directory, retriever, identity, keep_keys=keep_keys, progress=progress, started=started)
    if own_staging:
        shutil.rmtree(staging, ignore_errors=True)
    return db

