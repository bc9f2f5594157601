"""Per-split tables that let exit rules be replayed without running the backbone again.

One pass over a split (validation for calibration) keeps, per example, the head's logits at
every layer 0..L and, for retrieval strategies, the k neighbours its key finds in the exit
database. Any exit rule can then be simulated on thousands of settings in milliseconds
(:mod:`raee.calibration.simulate`), and the result is exact: the same head outputs and the same
neighbours as the exit loop would see.

Tables are cached on disk (safetensors) by the content of everything that shapes them: backbone,
head, data (including the split's texts and labels), key encoder, retriever, database and k.
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
from raee.features import iterate_all_layers


@dataclass
class SplitTables:
    """What a split looks like to an exit rule (N examples, L+1 layers, C classes, k neighbours)."""

    logits: torch.Tensor  # (N, L+1, C) float: the head's logits at every layer
    labels: torch.Tensor  # (N,) long
    distances: torch.Tensor | None = None  # (N, k) float, smaller = nearer (retrieval strategies only)
    ids: torch.Tensor | None = None  # (N, k) long database rows, -1 = no hit

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
        with atomic_path(Path(directory) / "tables.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))

    @classmethod
    def load(cls, directory: str | Path) -> SplitTables:
        t = load_file(str(Path(directory) / "tables.safetensors"))
        return cls(logits=t["logits"], labels=t["labels"], distances=t.get("distances"), ids=t.get("ids"))


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


def loader_for(datamodule: Any, split: str) -> Any:
    """The datamodule's loader of ``split`` ("validation" or "test")."""
    if split not in ("validation", "test"):
        raise ValueError(f"tables are built for the validation or test split, not {split!r}")
    return datamodule.val_dataloader() if split == "validation" else datamodule.test_dataloader()


@torch.no_grad()
def compute_tables(backbone: Any, head: Any, datamodule: Any, split: str = "validation", retrieval: Any = None,
                   progress: bool = True) -> SplitTables:
    """One all-layer pass over ``split``: every layer's head logits and, when ``retrieval`` (an object with
    ``neighbours(state, texts) -> (distances (B, k), ids (B, k))`` and ``plan_layer``, e.g. a fitted
    :class:`~raee.exits.RaeeExit`) is given, each example's neighbours from the keys at its layer."""
    logits, labels, distances, ids = [], [], [], []
    for states, batch in iterate_all_layers(backbone, head, loader_for(datamodule, split),
                                            desc=f"{split} tables", progress=progress):
        logits.append(torch.stack([head(s).float().cpu() for s in states], dim=1))  # (B, L+1, C)
        labels.append(torch.as_tensor(batch["label"]).long().cpu())
        if retrieval is not None:
            d, i = retrieval.neighbours(states[retrieval.plan_layer], list(batch["text"]))
            distances.append(d.cpu())
            ids.append(i.cpu())
    if not logits:
        raise UserError(f"the {split} split is empty: calibration needs {split} examples")
    return SplitTables(logits=torch.cat(logits), labels=torch.cat(labels),
                       distances=torch.cat(distances) if distances else None, ids=torch.cat(ids) if ids else None)


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


def load_or_compute_tables(backbone: Any, head: Any, datamodule: Any, split: str = "validation",
                           retrieval: Any = None, cache_dir: str | Path | None = None,
                           progress: bool = True) -> SplitTables:
    """:func:`compute_tables`, cached under ``cache_dir/tables/<content hash>`` (no cache when None)."""
    if cache_dir is None:
        return compute_tables(backbone, head, datamodule, split, retrieval, progress)
    from raee.cache import load_or_build
    from raee.experiment import fingerprint

    description = tables_key(backbone, head, datamodule, split, retrieval)
    target = Path(cache_dir) / "tables" / fingerprint(description)

    def build(tmp: Path) -> None:
        compute_tables(backbone, head, datamodule, split, retrieval, progress).save(tmp)
        atomic_write_text(tmp / "meta.json", json.dumps(description, indent=2, default=str))

    return load_or_build(target, build, SplitTables.load, what=f"{split} tables")
