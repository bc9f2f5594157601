"""The exit database's files: rows written shard by shard in compact types, read back memory-mapped.

Inside a database directory::

    shards/00000/keys.npy     (n, D) float32 retrieval keys (deleted after the index is filled
                              when the database does not keep its keys)
                 labels.npy   (n,) the smallest integer type that holds the class ids
                              (float32 for regression targets)
                 preds.npy    (n, L+1) the smallest integer type: predicted class at each layer
                 probs.npy    (n, L+1) float16: 1 - the probability of that prediction (the
                              complement keeps float16's precision where the rules decide: 0.99997
                              stays distinct from 1.0, which plain float16 rounds it to)
                 correct.npy  (n, ceil((L+1)/8)) uint8: per-layer correctness, bit-packed
                 ids.npy      (n,) the smallest integer type: the example's position in its source
    shards/00001/...

Plain ``.npy`` files written by numpy and read with ``np.load(mmap_mode="r", allow_pickle=False)``:
no pickle, and any numpy reads them. Each shard's record in meta.json lists its files with their
sizes and sha256; the database's content hash is the hash of those records, so it covers every
shard, and a shard that disagrees with its record is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from raee.assets import sha256_file as file_sha256
from raee.database.tables import ShardedTable
from raee.errors import SystemLimitError, UserError

SHARDS_DIR = "shards"
KEYS = "keys"
#: table name -> how ShardedTable decodes it
TABLES = {"labels": "int", "preds": "int", "probs": "complement", "correct": "bits", "ids": "int"}
#: bytes of rows buffered before a shard is written (sets the default shard size: 128 MiB of keys+tables)
SHARD_BUFFER_BYTES = 128 << 20
#: databases whose shard files total at most this many bytes are hash-checked in full on load
FULL_VERIFY_BYTES = 256 << 20


def shard_name(number: int) -> str:
    return f"{number:05d}"


def default_shard_rows(key_dim: int, num_layers: int) -> int:
    """Rows per shard so that one shard's buffer stays near SHARD_BUFFER_BYTES (at least 1024)."""
    row_bytes = 4 * key_dim + 16 * (num_layers + 1) + 16
    return max(1024, SHARD_BUFFER_BYTES // row_bytes)


def compact_int(values: np.ndarray) -> np.ndarray:
    """Integers in the smallest numpy integer type that holds them (floats stay float32)."""
    values = np.asarray(values)
    if np.issubdtype(values.dtype, np.floating):
        return values.astype(np.float32)
    if values.size == 0:
        return values.astype(np.uint8)
    lo, hi = int(values.min()), int(values.max())
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64) if lo >= 0 else (np.int8, np.int16, np.int32, np.int64):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return values.astype(dtype)
    raise ValueError(f"integer values {lo}..{hi} do not fit 64 bits")


def encode_rows(keys: np.ndarray, labels: np.ndarray, preds: np.ndarray, probs: np.ndarray, correct: np.ndarray,
                ids: np.ndarray) -> dict[str, np.ndarray]:
    """One batch of rows in the stored (compact) form; shapes as in the module docstring."""
    return {KEYS: np.ascontiguousarray(keys, dtype=np.float32), "labels": np.asarray(labels),
            "preds": np.asarray(preds), "probs": (1.0 - np.asarray(probs, dtype=np.float32)).astype(np.float16),
            "correct": np.packbits(np.asarray(correct, dtype=bool), axis=1, bitorder="little"),
            "ids": np.asarray(ids)}


class ShardWriter:
    """Buffers rows as batches come and writes them out ``shard_rows`` at a time.

    Memory: one buffer of at most ``shard_rows`` rows plus the batch being added, whatever the
    number of rows written in total. ``on_shard`` (if given) is called with each written shard's
    directory (progress reporting, tests).
    """

    def __init__(self, directory: str | Path, shard_rows: int, first_shard: int = 0,
                 source: dict[str, Any] | None = None, on_shard: Any = None) -> None:
        if shard_rows < 1:
            raise ValueError(f"shard_rows={shard_rows} must be at least 1")
        self.directory = Path(directory)
        self.shard_rows = int(shard_rows)
        self.next_shard = int(first_shard)
        self.source = dict(source or {})
        self.on_shard = on_shard
        self.written: list[str] = []
        self._buffer: list[dict[str, np.ndarray]] = []
        self._buffered = 0

    def add(self, *, keys: np.ndarray, labels: np.ndarray, preds: np.ndarray, probs: np.ndarray,
            correct: np.ndarray, ids: np.ndarray) -> None:
        """keys (B, D); labels, ids (B,); preds, probs, correct (B, L+1)."""
        rows = encode_rows(keys, labels, preds, probs, correct, ids)
        n = len(rows[KEYS])
        for name, value in rows.items():
            if len(value) != n:
                raise ValueError(f"batch tables disagree: {name} has {len(value)} rows, keys have {n}")
        self._buffer.append(rows)
        self._buffered += n
        while self._buffered >= self.shard_rows:
            self._flush(self.shard_rows)

    def close(self) -> list[str]:
        """Write what is left; the names of the shards written by this writer."""
        if self._buffered:
            self._flush(self._buffered)
        return self.written

    def _flush(self, count: int) -> None:
        merged = {name: np.concatenate([b[name] for b in self._buffer]) for name in self._buffer[0]}
        take = {name: value[:count] for name, value in merged.items()}
        left = {name: value[count:] for name, value in merged.items()}
        self._buffer = [left] if len(left[KEYS]) else []
        self._buffered -= count
        name = shard_name(self.next_shard)
        path = self.directory / name
        path.mkdir(parents=True, exist_ok=False)
        for table, value in take.items():
            np.save(path / f"{table}.npy", compact_int(value) if table in ("labels", "preds", "ids") else value,
                    allow_pickle=False)
        if self.source:
            (path / "source.json").write_text(json.dumps(self.source))
        self.next_shard += 1
        self.written.append(name)
        if self.on_shard is not None:
            self.on_shard(path)


def shard_record(directory: Path, name: str) -> dict[str, Any]:
    """meta.json's entry for one written shard: row count, source, and each file's size and sha256."""
    path = directory / SHARDS_DIR / name
    count = int(np.load(path / "ids.npy", mmap_mode="r", allow_pickle=False).shape[0])
    source = json.loads((path / "source.json").read_text()) if (path / "source.json").exists() else {}
    files = {f.name: {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
             for f in sorted(path.iterdir()) if f.suffix == ".npy"}
    return {"name": name, "count": count, "source": source, "files": files}


def content_hash(records: list[dict[str, Any]]) -> str:
    """One hash over every shard's files (their sha256), in shard order."""
    digest = [(r["name"], r["count"], sorted((f, v["sha256"]) for f, v in r["files"].items())) for r in records]
    return hashlib.sha256(json.dumps(digest).encode()).hexdigest()


def key_files(directory: Path, records: list[dict[str, Any]]) -> list[Path]:
    """The keys.npy of every shard, in order (written during a build even when not kept)."""
    return [directory / SHARDS_DIR / r["name"] / f"{KEYS}.npy" for r in records]


def iter_key_shards(paths: list[Path]) -> Iterator[np.ndarray]:
    """Each shard's keys, read whole (bounded by the shard size), one shard at a time."""
    for path in paths:
        yield np.load(path, allow_pickle=False)


def sample_keys(paths: list[Path], counts: list[int], size: int, seed: int) -> np.ndarray:
    """A seeded uniform sample of ``size`` keys across the shards (sorted rows), without reading
    more than the sampled rows and one shard's memory map at a time."""
    total = sum(counts)
    rows = np.sort(np.random.default_rng(seed).choice(total, size=min(size, total), replace=False))
    offsets = np.cumsum([0] + counts)
    out = []
    for i, path in enumerate(paths):
        local = rows[(rows >= offsets[i]) & (rows < offsets[i + 1])] - offsets[i]
        if len(local):
            out.append(np.array(np.load(path, mmap_mode="r", allow_pickle=False)[local], dtype=np.float32))
    return np.concatenate(out)


class ShardMismatch(UserError):
    """A database's shard files disagree with its metadata."""


def open_tables(directory: Path, meta: dict[str, Any], verify: bool | None = None) -> dict[str, ShardedTable]:
    """The memory-mapped tables (and keys, when kept) of the shards listed in meta.json.

    Refuses (ShardMismatch) a shard folder that is missing or not listed, a file whose size,
    shape or row count differs from the record, and, when ``verify`` (default: databases up to
    FULL_VERIFY_BYTES), a file whose sha256 differs.
    """
    records = meta.get("shards")
    if not isinstance(records, list) or not records:
        raise ShardMismatch(f"exit database {directory}: meta.json lists no shards")
    if meta.get("content_hash") != content_hash(records):
        raise ShardMismatch(f"exit database {directory}: the content hash in meta.json does not match its shard "
                            "records (meta.json was edited)")
    root = directory / SHARDS_DIR
    present = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    listed = [r["name"] for r in records]
    if present != sorted(listed):
        extra, missing = sorted(set(present) - set(listed)), sorted(set(listed) - set(present))
        raise ShardMismatch(f"exit database {directory}: its shard folders disagree with meta.json (not listed: "
                            f"{extra or 'none'}, missing: {missing or 'none'})")
    total_bytes = sum(f["bytes"] for r in records for f in r["files"].values())
    ensure_open_files(sum(len(r["files"]) for r in records))
    if verify is None:
        verify = total_bytes <= FULL_VERIFY_BYTES
    parts: dict[str, list[np.ndarray]] = {}
    for record in records:
        path = root / record["name"]
        names = sorted(p.name for p in path.iterdir() if p.suffix == ".npy")
        if names != sorted(record["files"]):
            raise ShardMismatch(f"exit database {directory}: shard {record['name']} holds {names}, meta.json lists "
                                f"{sorted(record['files'])}")
        for file, expected in record["files"].items():
            _check_file(path / file, expected, verify)
            try:
                array = np.load(path / file, mmap_mode="r", allow_pickle=False)
            except ValueError as err:
                raise ShardMismatch(f"exit database {directory}: {path / file} is not a readable .npy file "
                                    f"({err})") from err
            if array.shape[0] != record["count"]:
                raise ShardMismatch(f"exit database {directory}: {path / file} has {array.shape[0]} rows, meta.json "
                                    f"says {record['count']}")
            parts.setdefault(file[:-4], []).append(array)
    width = int(meta["num_layers"]) + 1
    tables = {name: ShardedTable(parts[name], decode, columns=width if decode == "bits" else None)
              for name, decode in TABLES.items()}
    if KEYS in parts:
        tables[KEYS] = ShardedTable(parts[KEYS], "float")
    return tables


def ensure_open_files(maps: int) -> None:
    """Each memory-mapped file keeps a file descriptor open (Python's mmap holds a duplicate): raise the
    soft limit towards the hard one when a database has more shard files than it allows."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = maps + 256  # headroom for everything else the process opens
    if need <= soft:
        return
    if hard != resource.RLIM_INFINITY and need > hard:
        raise SystemLimitError(f"the exit database has {maps} shard files to memory-map, more than this process "
                               f"may open (ulimit -n {hard}): raise the limit (ulimit -Hn) or rebuild with larger "
                               "shards")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def _check_file(path: Path, expected: dict[str, Any], verify: bool) -> None:
    size = path.stat().st_size
    if size != expected["bytes"]:
        raise ShardMismatch(f"{path} has {size} bytes, meta.json says {expected['bytes']} (truncated or modified)")
    if verify and file_sha256(path) != expected["sha256"]:
        raise ShardMismatch(f"{path} does not match its sha256 in meta.json (truncated or modified)")


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target`` (shards are never modified after writing), copying when the
    file system cannot link."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        import shutil

        shutil.copy2(source, target)
