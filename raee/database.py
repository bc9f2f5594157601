"""The RAEE exit database: per training example, its retrieval key and the layers that get it right.

On disk, one directory (written atomically: built beside the target, then renamed):

- ``meta.json``              backbone, head, key encoder, retriever, dataset, counts, content hash
- ``exit_info.safetensors``  keys (N, D), labels (N,), preds / probs / correct (N, L+1), ids (N,)
- ``index/``                 the retriever's own files (FAISS index or torch keys)

Keys are stored too, so that a sweep over retrievers rebuilds only the index, never the backbone pass.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import raee
from raee.aggregation.base import ExitInfo
from raee.backbones.base import LayerwiseBackbone
from raee.exits.simple import within_tolerance
from raee.features import encode_batch
from raee.keys import KeyEncoder

#: metadata fields that must match between a database and the run that uses it (``tolerance``: None for
#: classification, the regression tolerance a regression database's "correct" was computed with)
COMPATIBILITY_FIELDS = ("num_layers", "backbone", "head", "key_encoder", "tolerance")


@dataclass
class ExitDatabase:
    keys: torch.Tensor  # (N, D) float32
    info: ExitInfo
    ids: torch.Tensor  # (N,) positions in the training split
    meta: dict[str, Any]
    retriever: Any  # a raee.retrieval Retriever holding ``keys``

    @property
    def size(self) -> int:
        return int(self.keys.shape[0])

    def check_compatible(self, expected: dict[str, Any]) -> None:
        """Refuse a database built for another backbone, head, layer count or key encoder."""
        built, asked = self.meta.get("tolerance"), expected.get("tolerance")
        if "tolerance" in expected and built != asked and built is not None and asked is not None:
            raise ValueError(
                f"exit database {self.meta.get('path', '')} marks a regression prediction correct within tolerance "
                f"{built}, this run asks for {asked}: rebuild it with regression_tolerance={asked} (python -m "
                f"raee.build_db regression_tolerance={asked}) or run with regression_tolerance={built}")
        for field in COMPATIBILITY_FIELDS:
            if field in expected and self.meta.get(field) != expected[field]:
                raise ValueError(
                    f"exit database {self.meta.get('path', '')} was built for a different {field}: "
                    f"database has {self.meta.get(field)!r}, this run has {expected[field]!r}. "
                    "Rebuild it for this setup (python -m raee.build_db with the same overrides) or point "
                    "exit.database at a matching one")

    def save(self, directory: str | Path) -> None:
        """Write atomically: a crash leaves either the old database or the new one, never half."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            tensors = {"keys": self.keys.float().contiguous(), "labels": _stored(self.info.labels),
                       "preds": _stored(self.info.preds), "probs": self.info.probs.float(),
                       "correct": self.info.correct.to(torch.uint8), "ids": self.ids.long()}
            save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(tmp / "exit_info.safetensors"))
            self.retriever.save(tmp / "index")
            meta = dict(self.meta, content_hash=_content_hash(tmp / "exit_info.safetensors"))
            meta.pop("path", None)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            old = None
            if directory.exists():
                old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
                os.replace(directory, old)
            os.replace(tmp, directory)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            self.meta = dict(meta, path=str(directory))
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, directory: str | Path) -> "ExitDatabase":
        directory = Path(directory)
        meta_path, info_path = directory / "meta.json", directory / "exit_info.safetensors"
        for path in (meta_path, info_path):
            if not path.exists():
                raise FileNotFoundError(f"exit database {directory} has no {path.name}: build it with "
                                        "`python -m raee.build_db` (or let exit=raee build it)")
        meta = json.loads(meta_path.read_text())
        if meta.get("content_hash") != _content_hash(info_path):
            raise ValueError(f"exit database {directory}: exit_info.safetensors does not match the content hash in "
                             "meta.json (truncated or modified); rebuild it with `python -m raee.build_db`")
        t = load_file(str(info_path))
        info = ExitInfo(preds=t["preds"], probs=t["probs"], correct=t["correct"].bool(), labels=t["labels"])
        retriever = _retriever_class(meta["retriever"]["class"]).load(directory / "index")
        return cls(keys=t["keys"], info=info, ids=t["ids"], meta=dict(meta, path=str(directory)), retriever=retriever)

    def with_retriever(self, retriever: Any) -> "ExitDatabase":
        """The same exit information searched by another retriever (index rebuilt from the stored keys)."""
        retriever.add(self.keys.numpy())
        meta = dict(self.meta, retriever=describe_retriever(retriever))
        return ExitDatabase(keys=self.keys, info=self.info, ids=self.ids, meta=meta, retriever=retriever)


def _stored(values: torch.Tensor) -> torch.Tensor:
    """Class ids as int64, regression values as float32."""
    return values.float() if values.is_floating_point() else values.long()


def describe_retriever(retriever: Any) -> dict[str, Any]:
    cls = type(retriever)
    desc = retriever.describe() if hasattr(retriever, "describe") else {}
    return dict(desc, **{"class": f"{cls.__module__}:{cls.__qualname__}"})


def _retriever_class(path: str) -> Any:
    module, _, name = path.partition(":")
    if not module.startswith("raee."):
        raise ValueError(f"database names retriever class {path!r}, which is not part of raee; refusing to import it")
    return getattr(importlib.import_module(module), name)


def _content_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def setup_description(backbone: LayerwiseBackbone, head: Any, key_encoder: KeyEncoder,
                      tolerance: float | None = None) -> dict[str, Any]:
    """The fields a database and a run must agree on; ``tolerance`` only counts for a regression head."""
    return {"backbone": backbone.name, "num_layers": backbone.num_layers, "head": head.describe(),
            "key_encoder": key_encoder.describe(),
            "tolerance": float(tolerance) if getattr(head, "regression", False) and tolerance is not None else None}


def exit_rows(outputs: list[torch.Tensor], labels: torch.Tensor, tolerance: float | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One example's exit information per layer: outputs, the head's (B, C) output at each layer 0..L.

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


def select_fraction(n: int, fraction: float, seed: int) -> np.ndarray:
    """Seeded sorted subset of range(n) of size round(fraction * n) (at least 1)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"db.fraction={fraction} must be in (0, 1]")
    if n == 0:
        raise ValueError("the training split is empty: the exit database needs training examples")
    count = max(1, int(round(fraction * n)))
    return np.sort(np.random.default_rng(seed).permutation(n)[:count])


@torch.no_grad()
def build_database(backbone: LayerwiseBackbone, head: Any, key_encoder: KeyEncoder, retriever: Any,
                   datamodule: Any, *, fraction: float = 1.0, seed: int = 42, progress: bool = True,
                   tolerance: float | None = None) -> ExitDatabase:
    """One pass of the backbone over (a fraction of) the training split, batch by batch.

    Per example it keeps the key and, for every layer 0..L, the prediction and its probability
    (:func:`exit_rows`); hidden states are dropped after each batch, so memory stays at one batch of
    states. A regression head needs ``tolerance`` (stored in the metadata and checked on use).
    """
    regression = bool(getattr(head, "regression", False))
    if regression and (tolerance is None or not tolerance >= 0):
        raise ValueError(f"a regression exit database needs a tolerance >= 0 (got {tolerance}): a layer counts as "
                         "correct when |prediction - target| <= tolerance; set regression_tolerance")
    n_train = len(datamodule.split("train"))
    chosen = torch.from_numpy(select_fraction(n_train, fraction, seed))
    keys, labels, preds, probs, correct, ids = [], [], [], [], [], []
    loader = datamodule.train_dataloader()
    started = time.perf_counter()
    for batch in tqdm(loader, desc="exit database", disable=not progress, leave=False):
        take = torch.isin(batch["index"], chosen)
        if not take.any():
            continue
        batch = _subset(batch, take)
        enc = encode_batch(backbone, head, batch)
        states = backbone.all_layers(**enc)
        keys.append(key_encoder.encode(states[key_encoder.plan_layer], list(batch["text"])).cpu())
        p, c, ok = exit_rows([head(s) for s in states], batch["label"], tolerance if regression else None)
        preds.append(p)
        probs.append(c)
        correct.append(ok)
        labels.append(batch["label"].cpu() if regression else batch["label"].long().cpu())
        ids.append(batch["index"].long().cpu())
    if not keys:
        raise ValueError("no training example was selected for the exit database (empty training split?)")
    keys_t, labels_t, preds_t = torch.cat(keys), torch.cat(labels), torch.cat(preds)
    info = ExitInfo(preds=preds_t, probs=torch.cat(probs), correct=torch.cat(correct), labels=labels_t)
    retriever.add(keys_t.numpy().astype(np.float32))
    meta = setup_description(backbone, head, key_encoder, tolerance) | {
        "retriever": describe_retriever(retriever),
        "dataset": getattr(datamodule, "name", None), "split": "train", "fraction": fraction, "seed": seed,
        "count": int(keys_t.shape[0]), "train_size": n_train, "key_dim": int(keys_t.shape[1]),
        "build_seconds": time.perf_counter() - started, "version": raee.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return ExitDatabase(keys=keys_t, info=info, ids=torch.cat(ids), meta=meta, retriever=retriever)


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
