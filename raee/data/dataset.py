"""In-memory text examples and the batch collate function of the data contract."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from raee.errors import UserError

TASK_TYPES = ("classification", "regression", "generation")


class TextDataset(Dataset):
    """Examples of one split, held in memory.

    Item ``i`` is ``{"text": str, "text_pair": str | None, "label": int | float, "index": i}``, plus
    ``"target": str`` for generation.
    ``labels`` is a LongTensor (N,) for classification, a FloatTensor (N,) for regression; for generation
    it holds the strata the splits were drawn by (class ids, or 0) and ``targets`` the reference texts.
    """

    def __init__(self, texts: Sequence[str], labels: Sequence[int] | Sequence[float] | torch.Tensor,
                 text_pairs: Sequence[str] | None = None, label_names: Sequence[str] | None = None,
                 task_type: str = "classification", name: str = "", targets: Sequence[str] | None = None) -> None:
        if task_type not in TASK_TYPES:
            raise UserError(f"task_type={task_type!r} is not supported: use one of {list(TASK_TYPES)}")
        if len(texts) != len(labels):
            raise ValueError(f"TextDataset got {len(texts)} texts but {len(labels)} labels: give one label per text")
        if text_pairs is not None and len(text_pairs) != len(texts):
            raise ValueError(f"TextDataset got {len(texts)} texts but {len(text_pairs)} text pairs: "
                             "give one pair per text (or text_pairs=None)")
        if (task_type == "generation") != (targets is not None):
            raise ValueError(f"TextDataset: targets are given for generation tasks and only for them (task_type="
                             f"{task_type!r}, targets {'given' if targets is not None else 'missing'})")
        if targets is not None and len(targets) != len(texts):
            raise ValueError(f"TextDataset got {len(texts)} texts but {len(targets)} targets: give one target per text")
        dtype = torch.float32 if task_type == "regression" else torch.long
        self.texts: list[str] = [str(t) for t in texts]
        self.text_pairs: list[str] | None = None if text_pairs is None else [str(t) for t in text_pairs]
        self.targets: list[str] | None = None if targets is None else [str(t) for t in targets]
        # why copy: labels may be a read-only numpy view of a DataFrame column
        label_tensor = (labels.detach().clone() if isinstance(labels, torch.Tensor)
                        else torch.from_numpy(np.array(labels)))
        self.labels: torch.Tensor = label_tensor.to(dtype).reshape(-1)
        self.label_names: list[str] = [str(n) for n in (label_names or [])]
        self.task_type = task_type
        self.name = name
        if task_type == "classification" and len(self.labels) and self.label_names:
            low, high = int(self.labels.min()), int(self.labels.max())
            if low < 0 or high >= len(self.label_names):
                raise UserError(f"dataset {name!r} has label ids in [{low}, {high}] but only {len(self.label_names)} "
                                f"label names {self.label_names}: labels must be ids 0..{len(self.label_names) - 1}")

    @property
    def is_pair(self) -> bool:
        return self.text_pairs is not None

    @property
    def num_classes(self) -> int:
        """Number of classes; 1 (one output) for regression."""
        return len(self.label_names) if self.task_type == "classification" else 1  # generation: unused

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"text": self.texts[i], "text_pair": None if self.text_pairs is None else self.text_pairs[i],
                "label": self.labels[i].item(), "index": int(i)}
        if self.targets is not None:
            item["target"] = self.targets[i]
        return item

    def subset(self, indices: Sequence[int], name: str | None = None) -> TextDataset:
        """A new dataset with the examples at ``indices`` (in that order); indices restart at 0."""
        idx = [int(i) for i in indices]
        return TextDataset([self.texts[i] for i in idx], self.labels[idx] if idx else self.labels[:0],
                           None if self.text_pairs is None else [self.text_pairs[i] for i in idx],
                           self.label_names, self.task_type, self.name if name is None else name,
                           None if self.targets is None else [self.targets[i] for i in idx])

    def __repr__(self) -> str:
        return (f"TextDataset(name={self.name!r}, n={len(self)}, task_type={self.task_type!r}, "
                f"classes={len(self.label_names)}, pair={self.is_pair})")


def collate_batch(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Items -> batch dict: text list[str], text_pair list[str] | None, label (B,), index LongTensor (B,), and
    target list[str] for generation."""
    labels = [it["label"] for it in items]
    # float labels only come from regression datasets; keep their dtype
    label = torch.tensor(labels, dtype=torch.float32 if any(isinstance(v, float) for v in labels) else torch.long)
    pairs = [it["text_pair"] for it in items]
    return {"text": [it["text"] for it in items],
            "text_pair": None if all(p is None for p in pairs) else [p if p is not None else "" for p in pairs],
            "label": label, "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
            **({"target": [it["target"] for it in items]} if items and "target" in items[0] else {})}
