"""The rows of an exit database, its index and meta.json; appending to one, in bounded memory.

Rows: one batch through every layer gives each example's key and exit tables (:func:`exit_rows`),
which a :class:`~raee.database.store.ShardWriter` writes shard by shard (memory: one batch plus one
shard's buffer, whatever N is); :mod:`raee.database.parts` plans and runs the pass (in parts,
resumable). Finish (:func:`finish_database`): the index is trained on a seeded sample of the stored
keys and filled shard by shard, the keys are dropped unless kept, and meta.json is written last: a
directory without it never loads, so an interrupted build leaves nothing that passes for complete.

Append: new shards beside the existing ones (hard links, nothing recomputed), the existing index
extended with the new keys, meta.json and its content hash rewritten; built in a new directory
that replaces the old one atomically under the cache's file lock (:func:`raee.cache.load_or_build`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from raee.atomic import atomic_write_text
from raee.backbones.base import LayerwiseBackbone
from raee.database import store
from raee.database.exit_db import (INDEX_DIR, META_FILE, ExitDatabase, describe_retriever, retriever_class,
                                   setup_description)
from raee.errors import UserError
from raee.exits.simple import within_tolerance
from raee.features import encode_batch, run_to_layer
from raee.keys import KeyEncoder

#: db.keep_keys=auto keeps the raw float32 keys when they take at most this much disk (N x D x 4 bytes):
#: 2 GiB is 1.4M MiniLM keys (D=384) or 130k Llama-3-8B keys (D=4096)
KEEP_KEYS_AUTO_BYTES = 2 << 30


def resolve_keep_keys(keep_keys: bool | str, count: int, dim: int) -> bool:
    """db.keep_keys (true / false / auto) for ``count`` keys of dimension ``dim`` -> keep them or not."""
    text = str(keep_keys).strip().lower()
    if text not in ("true", "false", "auto"):
        raise UserError(f"db.keep_keys={keep_keys!r} must be true, false or auto")
    if text == "auto":
        return count * dim * 4 <= KEEP_KEYS_AUTO_BYTES
    return text == "true"


def select_fraction(n: int, fraction: float, seed: int) -> np.ndarray:
    """Seeded sorted subset of range(n) of size round(fraction * n) (at least 1)."""
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"db.fraction={fraction} must be in (0, 1]")
    if n == 0:
        raise UserError("the training split is empty: the exit database needs training examples")
    count = max(1, int(round(fraction * n)))
    return np.sort(np.random.default_rng(seed).permutation(n)[:count])


@torch.no_grad()
def exit_rows(backbone: LayerwiseBackbone, head: Any, key_encoder: KeyEncoder, batch: dict[str, Any],
              tolerance: float | None = None, layer_logits: Any = None) -> dict[str, np.ndarray]:
    """One batch through every layer -> its database rows: keys (B, D), labels (B,), ids (B,) and, per
    layer 0..L, preds (B, L+1), probs (B, L+1) and correct (B, L+1) (:func:`layer_rows`). Hidden
    states are dropped on return.

    layer_logits: the training split's per-layer head outputs computed before
    (:func:`raee.calibration.tables.load_or_compute_layer_logits`); then the batch runs only up to the key layer."""
    enc = encode_batch(backbone, head, batch)
    if layer_logits is None:
        states = backbone.all_layers(**enc)
        keys = key_encoder.encode(states[key_encoder.plan_layer], list(batch["text"]))
        outputs = [head(s) for s in states]
    else:
        keys = key_encoder.encode(run_to_layer(backbone, enc, key_encoder.plan_layer), list(batch["text"]))
        stored = layer_logits.logits[layer_logits.rows_of(batch["index"])]  # (B, L+1, C)
        outputs = list(stored.unbind(1))
    preds, probs, correct = layer_rows(outputs, batch["label"], tolerance)
    return {"keys": keys.float().cpu().numpy(), "labels": batch["label"].cpu().numpy(), "preds": preds.numpy(),
            "probs": probs.numpy(), "correct": correct.numpy(), "ids": batch["index"].long().cpu().numpy()}


def layer_rows(outputs: list[torch.Tensor], labels: torch.Tensor, tolerance: float | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exit information per layer from the head's (B, C) output at each layer 0..L.

    Classification: preds (B, L+1) the predicted class, probs its softmax probability, correct = pred == label.
    Regression (``tolerance`` given, C = 1): preds the predicted values, correct = |pred - label| <= tolerance,
    probs its closeness 1 - |pred - label| / tolerance (1 = exact, 0 at the tolerance or beyond), which the
    aggregation rules read like a probability.
    """
    if tolerance is None:
        layer_probs = torch.stack([torch.softmax(o.float(), -1) for o in outputs], dim=1).cpu()  # (B, L+1, C)
        probs, preds = layer_probs.max(-1)
        return preds, probs, preds == labels.long().cpu().unsqueeze(1)
    values = torch.stack([o[:, 0].float() for o in outputs], dim=1).cpu()  # (B, L+1)
    targets = labels.float().cpu().unsqueeze(1)
    correct = within_tolerance(values, targets, tolerance)
    closeness = (1.0 - (values - targets).abs() / tolerance).clamp(min=0.0) if tolerance > 0 else correct.float()
    return values, closeness, correct


def regression_tolerance(head: Any, tolerance: float | None) -> float | None:
    """The tolerance a database built with ``head`` uses: None for classification; for a regression head
    the given one, refused unless >= 0."""
    if not getattr(head, "regression", False):
        return None
    if tolerance is None or not tolerance >= 0:
        raise UserError(f"a regression exit database needs a tolerance >= 0 (got {tolerance}): a layer counts as "
                        "correct when |prediction - target| <= tolerance; set regression_tolerance")
    return float(tolerance)


def fill_index(retriever: Any, key_files: list[Path], counts: list[int], *, seed: int,
               extend: bool = False, progress: bool = True) -> None:
    """Fill ``retriever`` from stored key shards: trained first on a seeded sample of
    ``retriever.train_size(N, D)`` keys when it needs training (unless ``extend``: an existing,
    trained index gets more keys), then given one shard at a time."""
    if not extend:
        dim = int(np.load(key_files[0], mmap_mode="r", allow_pickle=False).shape[1])
        want = retriever.train_size(sum(counts), dim)
        if want:
            retriever.train(store.sample_keys(key_files, counts, want, seed), sum(counts))
    for keys in tqdm(store.iter_key_shards(key_files), total=len(key_files), desc="index", unit="shard",
                     disable=not progress, leave=False):
        retriever.add(keys)


def finish_database(directory: Path, retriever: Any, meta: dict[str, Any], new_shards: list[str],
                    old_records: list[dict[str, Any]] | None = None, started: float | None = None,
                    progress: bool = True, new_records: list[dict[str, Any]] | None = None) -> ExitDatabase:
    """Index the new shards' keys (a fresh index, or ``retriever`` extended when there are old shards),
    drop the keys unless kept, and write meta.json last. ``new_records``: the new shards' records when
    already computed and checked (a merge), else they are computed here (each file hashed)."""
    old_records = old_records or []
    key_files = store.key_files(directory, [{"name": n} for n in new_shards])
    counts = [int(np.load(f, mmap_mode="r", allow_pickle=False).shape[0]) for f in key_files]
    retriever.workdir = directory / INDEX_DIR  # an on-disk index grows its lists in place
    fill_index(retriever, key_files, counts, seed=int(meta["seed"]), extend=bool(old_records), progress=progress)
    retriever.save(directory / INDEX_DIR)
    if not meta["keep_keys"]:
        for path in key_files:
            path.unlink()
    records = old_records + (new_records or [store.shard_record(directory, name) for name in new_shards])
    meta = dict(meta, retriever=describe_retriever(retriever), count=sum(r["count"] for r in records),
                key_dim=int(retriever.dim), shards=records, content_hash=store.content_hash(records))
    if started is not None:
        meta["build_seconds"] = time.perf_counter() - started
    meta.pop("path", None)
    atomic_write_text(directory / META_FILE, json.dumps(meta, indent=2))
    return ExitDatabase.load(directory)


@torch.no_grad()
def append_database(directory: str | Path, backbone: LayerwiseBackbone, head: Any, key_encoder: KeyEncoder,
                    batches: Iterable[dict[str, Any]], *, source: dict[str, Any], shard_rows: int | None = None,
                    progress: bool = True) -> ExitDatabase:
    """Add the examples in ``batches`` (the data contract: text, text_pair, label, index) to the database
    in ``directory``: new shards, the stored index extended with their keys, a new content hash.

    The old rows are not recomputed (their shard files are hard-linked into the new version). A
    database whose shards disagree with its metadata is refused; so is a source whose ``sha256``
    was appended before.
    """
    from raee.cache import load_or_build

    directory = Path(directory)
    started = time.perf_counter()

    key_encoder.bind(backbone, head)

    def build(new: Path) -> None:
        old = ExitDatabase.load(directory)
        tolerance = old.meta.get("tolerance")  # appended rows are judged as the old ones were
        old.check_compatible(setup_description(backbone, head, key_encoder, tolerance))
        records = old.meta["shards"]
        seen = [r["source"].get("sha256") for r in records]
        if source.get("sha256") and source["sha256"] in seen:
            raise UserError(f"{source.get('file', 'these examples')} (sha256 {source['sha256'][:12]}...) were already "
                            f"appended to exit database {directory}; nothing to do")
        for record in records:
            for file in [*record["files"], "source.json"]:
                if (directory / store.SHARDS_DIR / record["name"] / file).exists():
                    store.link_or_copy(directory / store.SHARDS_DIR / record["name"] / file,
                                       new / store.SHARDS_DIR / record["name"] / file)
        writer = store.ShardWriter(new / store.SHARDS_DIR,
                                   shard_rows or store.default_shard_rows(old.key_dim, old.info.num_layers),
                                   first_shard=len(records), source=source)
        for batch in tqdm(batches, desc="append", disable=not progress, leave=False):
            writer.add(**exit_rows(backbone, head, key_encoder, batch, tolerance))
        shards = writer.close()
        if not shards:
            raise UserError(f"nothing to append to exit database {directory}: {source} has no examples")
        retriever = retriever_class(old.meta["retriever"]["class"]).load(directory / INDEX_DIR, writable=True)
        meta = {k: v for k, v in old.meta.items() if k != "path"}
        meta["modified"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        finish_database(new, retriever, meta, shards, old_records=records, started=started, progress=progress)

    return load_or_build(directory, build, ExitDatabase.load, auto=False, what="exit database", rebuild=True)


def _subset(batch: dict[str, Any], take: torch.Tensor) -> dict[str, Any]:
    rows = torch.nonzero(take).flatten().tolist()
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value[take]
        elif isinstance(value, list):
            out[key] = [value[i] for i in rows]
        else:
            out[key] = value
    return out
