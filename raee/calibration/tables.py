"""Per-split tables that let exit rules be replayed without running the backbone again.

One pass over a split (validation for calibration) keeps, per example, the head's logits at
every layer 0..L and, for retrieval strategies, the k neighbours its key finds in the exit
database. Any exit rule can then be simulated on thousands of settings in milliseconds
(:mod:`raee.calibration.simulate`), and the result is exact: the same head outputs and the same
neighbours as the exit loop would see.

Tables are cached on disk (safetensors) by the content of everything that shapes them: backbone,
head, data (including the split's texts and labels), key encoder, retriever, database and k. The per-layer
logits do not depend on the keys, so they have a cache of their own (``layer_logits/``, one all-layer pass per
split, the training split's too for the exit database): every key setting then needs only a pass up to its
key layer (:func:`compute_neighbours`). Tables also keep each example's FLOPs of one backbone layer and of
its key (:mod:`raee.cost`), so calibration can count the keys' cost in layer equivalents.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from raee.atomic import atomic_path, atomic_write_text
from raee.errors import UserError
from raee.features import iterate_all_layers, iterate_to_layer


@dataclass
class SplitTables:
    """What a split looks like to an exit rule (N examples, L+1 layers, C classes, k neighbours)."""

    logits: torch.Tensor  # (N, L+1, C) float: the head's logits at every layer
    labels: torch.Tensor  # (N,) long
    distances: torch.Tensor | None = None  # (N, k) float, smaller = nearer (retrieval strategies only)
    ids: torch.Tensor | None = None  # (N, k) long database rows, -1 = no hit
    layer_flops: torch.Tensor | None = None  # (N,) float64 FLOPs of one backbone layer on each example
    key_flops: torch.Tensor | None = None  # (N,) float64 FLOPs of each example's key beyond the backbone's layers
    index: torch.Tensor | None = None  # (N,) long position of each example in its split (None: 0..N-1)

    def __post_init__(self) -> None:
        if self.logits.ndim != 3 or self.labels.shape != self.logits.shape[:1]:
            raise ValueError(f"SplitTables: logits must be (N, L+1, C) and labels (N,), got "
                             f"{tuple(self.logits.shape)} and {tuple(self.labels.shape)}")
        if (self.ids is None) != (self.distances is None):
            raise ValueError("SplitTables: give both ids and distances, or neither")
        if self.ids is not None and (self.ids.shape != self.distances.shape or self.ids.shape[0] != self.size):
            raise ValueError(f"SplitTables: ids {tuple(self.ids.shape)} and distances {tuple(self.distances.shape)} "
                             f"must both be (N={self.size}, k)")

    @property
    def size(self) -> int:
        return int(self.logits.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.logits.shape[1]) - 1

    @property
    def has_neighbours(self) -> bool:
        return self.ids is not None

    def key_layer_equivalents(self) -> float:
        """The keys' cost in backbone layers: sum of key FLOPs / sum of one layer's FLOPs (0 when not counted)."""
        if self.key_flops is None or self.layer_flops is None or not float(self.layer_flops.sum()) > 0:
            return 0.0
        return float(self.key_flops.sum() / self.layer_flops.sum())

    def rows_of(self, index: torch.Tensor) -> torch.Tensor:
        """(B,) rows of these tables holding the examples at split positions ``index`` (B,)."""
        if self.index is None:
            return torch.as_tensor(index).long()
        if getattr(self, "_row_of", None) is None:
            self._row_of = torch.full((int(self.index.max()) + 1,), -1, dtype=torch.long)
            self._row_of[self.index] = torch.arange(self.size)
        rows = self._row_of[torch.as_tensor(index).long()]
        if bool((rows < 0).any()):
            raise UserError("these tables do not hold every example asked for: they were computed on other data")
        return rows

    def predictions(self) -> torch.Tensor:
        """(N, L+1) predicted class at every layer."""
        return self.logits.argmax(-1)

    def correct(self) -> torch.Tensor:
        """(N, L+1) bool: the prediction at each layer is the label."""
        return self.predictions() == self.labels.unsqueeze(1)

    def save(self, directory: str | Path) -> None:
        tensors = {"logits": self.logits.float(), "labels": self.labels.long()}
        if self.ids is not None:
            tensors |= {"ids": self.ids.long(), "distances": self.distances.float()}
        tensors |= {name: getattr(self, name) for name in ("layer_flops", "key_flops", "index")
                    if getattr(self, name) is not None}
        with atomic_path(Path(directory) / "tables.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))

    @classmethod
    def load(cls, directory: str | Path) -> SplitTables:
        t = load_file(str(Path(directory) / "tables.safetensors"))
        return cls(logits=t["logits"], labels=t["labels"], distances=t.get("distances"), ids=t.get("ids"),
                   layer_flops=t.get("layer_flops"), key_flops=t.get("key_flops"), index=t.get("index"))


def split_fingerprint(dataset: Any) -> str:
    """sha256 of a split's texts (and pairs) and labels: tables and calibrations follow the data itself."""
    h = hashlib.sha256()
    for i in range(len(dataset)):
        item = dataset[i]
        if isinstance(item, dict):
            h.update(json.dumps([item["text"], item.get("text_pair"), item["label"]], default=str).encode())
        else:  # (text, label) pairs of minimal datamodules
            h.update(json.dumps(list(item), default=str).encode())
    return h.hexdigest()[:16]


def loader_for(datamodule: Any, split: str, train: bool = False) -> Any:
    """The datamodule's loader of ``split`` ("validation" or "test"; "train" too when ``train``: the exit
    database's per-layer logits)."""
    loaders = {"validation": "val_dataloader", "test": "test_dataloader"} | ({"train": "train_dataloader"} if train
                                                                             else {})
    if split not in loaders:
        raise ValueError(f"tables are built for the {' or '.join(loaders)} split, not {split!r}")
    return getattr(datamodule, loaders[split])()


def batch_index(batch: dict[str, Any], offset: int) -> torch.Tensor:
    """(B,) the batch's positions in its split (its "index" column; minimal data modules without one count
    from ``offset``)."""
    index = batch.get("index") if isinstance(batch, dict) else None
    return torch.as_tensor(index).long().cpu() if index is not None else torch.arange(offset, offset + len(batch["text"]))


@torch.no_grad()
def compute_tables(backbone: Any, head: Any, datamodule: Any, split: str = "validation", retrieval: Any = None,
                   progress: bool = True) -> SplitTables:
    """One all-layer pass over ``split``: every layer's head logits and, when ``retrieval`` (an object with
    ``neighbours(state, texts) -> (distances (B, k), ids (B, k))``, ``plan_layer`` and ``key_encoder``, e.g. a
    fitted :class:`~raee.exits.RaeeExit`) is given, each example's neighbours from the keys at its layer."""
    return compute_layer_logits(backbone, head, loader_for(datamodule, split), f"{split} tables", progress, retrieval)


@torch.no_grad()
def compute_layer_logits(backbone: Any, head: Any, batches: Any, desc: str, progress: bool = True,
                         retrieval: Any = None) -> SplitTables:
    """One all-layer pass over ``batches``: logits (N, L+1, C), labels, index and one layer's FLOPs per example,
    and the neighbours when ``retrieval`` is given (:func:`compute_tables`)."""
    from raee.cost import layer_flops as flops_of_layer

    logits, labels, index, flops, distances, ids, key_flops = [], [], [], [], [], [], []
    for states, batch in iterate_all_layers(backbone, head, batches, desc=desc, progress=progress):
        logits.append(torch.stack([head(s).float().cpu() for s in states], dim=1))  # (B, L+1, C)
        labels.append(torch.as_tensor(batch["label"]).long().cpu())
        index.append(batch_index(batch, sum(len(i) for i in index)))
        flops.append(flops_of_layer(backbone.config, states[0].attention_mask.sum(1).cpu()))
        if retrieval is not None:
            d, i = retrieval.neighbours(states[retrieval.plan_layer], list(batch["text"]))
            distances.append(d.cpu())
            ids.append(i.cpu())
            key_flops.append(retrieval.key_encoder.flops(list(batch["text"])))
    if not logits:
        raise UserError(f"{desc}: the split is empty: calibration needs its examples")
    return SplitTables(logits=torch.cat(logits), labels=torch.cat(labels), index=torch.cat(index),
                       layer_flops=torch.cat(flops), distances=torch.cat(distances) if distances else None,
                       ids=torch.cat(ids) if ids else None, key_flops=torch.cat(key_flops) if key_flops else None)


@torch.no_grad()
def compute_neighbours(backbone: Any, head: Any, batches: Any, retrieval: Any, desc: str = "neighbours",
                       progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each example's neighbours from a pass up to the key layer only: (distances (N, k), ids (N, k), key FLOPs
    (N,), index (N,))."""
    distances, ids, key_flops, index = [], [], [], []
    for state, batch in iterate_to_layer(backbone, head, batches, retrieval.plan_layer, desc=desc, progress=progress):
        d, i = retrieval.neighbours(state, list(batch["text"]))
        distances.append(d.cpu())
        ids.append(i.cpu())
        key_flops.append(retrieval.key_encoder.flops(list(batch["text"])))
        index.append(batch_index(batch, sum(len(x) for x in index)))
    if not index:
        raise UserError(f"{desc}: the split is empty")
    return torch.cat(distances), torch.cat(ids), torch.cat(key_flops), torch.cat(index)


def tables_key(backbone: Any, head: Any, datamodule: Any, split: str, retrieval: Any = None) -> dict[str, Any]:
    """Everything the tables of ``split`` depend on (the cache key's description)."""
    from raee.experiment import data_description

    dataset = datamodule.split(split)
    key: dict[str, Any] = {"backbone": backbone.describe(), "head": head.describe(),
                           "data": data_description(datamodule), "split": split,
                           "split_content": split_fingerprint(dataset)}
    if retrieval is not None:
        key["retrieval"] = retrieval.retrieval_description()
    return key


def load_or_compute_layer_logits(backbone: Any, head: Any, datamodule: Any, split: str,
                                 cache_dir: str | Path | None = None, progress: bool = True) -> SplitTables:
    """Every layer's logits on ``split`` ("train" too), without neighbours, cached under
    ``cache_dir/layer_logits/<content hash>`` (no cache when None): the one all-layer pass every key setting shares."""
    loader = loader_for(datamodule, split, train=True)
    if cache_dir is None:
        return compute_layer_logits(backbone, head, loader, f"{split} layers", progress)
    from raee.cache import load_or_build
    from raee.experiment import fingerprint

    description = tables_key(backbone, head, datamodule, split) | {"kind": "layer_logits", "format": 1}
    target = Path(cache_dir) / "layer_logits" / fingerprint(description)

    def build(tmp: Path) -> None:
        compute_layer_logits(backbone, head, loader, f"{split} layers", progress).save(tmp)
        atomic_write_text(tmp / "meta.json", json.dumps(description, indent=2, default=str))

    return load_or_build(target, build, SplitTables.load, what=f"{split} layer logits")


def load_or_compute_tables(backbone: Any, head: Any, datamodule: Any, split: str = "validation",
                           retrieval: Any = None, cache_dir: str | Path | None = None,
                           progress: bool = True) -> SplitTables:
    """:func:`compute_tables`, cached under ``cache_dir/tables/<content hash>`` (no cache when None): the per-layer
    logits from :func:`load_or_compute_layer_logits`, the neighbours from a pass up to the key layer."""
    if cache_dir is None:
        return compute_tables(backbone, head, datamodule, split, retrieval, progress)
    logits = load_or_compute_layer_logits(backbone, head, datamodule, split, cache_dir, progress)
    if retrieval is None:
        return logits
    from raee.cache import load_or_build
    from raee.experiment import fingerprint

    description = tables_key(backbone, head, datamodule, split, retrieval) | {"format": 2}
    target = Path(cache_dir) / "tables" / fingerprint(description)

    def build(tmp: Path) -> None:
        distances, ids, key_flops, index = compute_neighbours(backbone, head, loader_for(datamodule, split), retrieval,
                                                              f"{split} neighbours", progress)
        rows = logits.rows_of(index)
        SplitTables(logits=logits.logits[rows], labels=logits.labels[rows], distances=distances, ids=ids,
                    layer_flops=logits.layer_flops[rows] if logits.layer_flops is not None else None,
                    key_flops=key_flops, index=index).save(tmp)
        atomic_write_text(tmp / "meta.json", json.dumps(description, indent=2, default=str))

    return load_or_build(target, build, SplitTables.load, what=f"{split} tables")
