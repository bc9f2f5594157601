"""Exact search with a torch matmul + top-k: works everywhere (CPU or GPU) and is the
reference the FAISS retrievers are tested against."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from raee.atomic import atomic_path, atomic_write_text
from raee.retrieval.base import Retriever, check_keys


class TorchExactRetriever(Retriever):
    def __init__(self, metric: str = "ip", device: str = "cpu") -> None:
        super().__init__(metric)
        self.device = device
        self.keys = torch.zeros(0, 0)

    @property
    def ntotal(self) -> int:
        return int(self.keys.shape[0])

    def add(self, keys: np.ndarray) -> None:
        new = torch.from_numpy(check_keys(keys, self.keys.shape[1] if self.ntotal else None)).to(self.device)
        self.keys = torch.cat([self.keys.to(self.device), new]) if self.ntotal else new

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = torch.from_numpy(queries).to(self.device)
        if self.metric == "ip":
            scores, ids = (q @ self.keys.T).topk(k, dim=1)
        else:
            # squared L2 as FAISS reports it
            d = (q * q).sum(1, keepdim=True) - 2 * q @ self.keys.T + (self.keys * self.keys).sum(1)
            scores, ids = d.clamp(min=0).topk(k, dim=1, largest=False)
        return scores.cpu().numpy(), ids.cpu().numpy()

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        with atomic_path(directory / "keys.safetensors") as tmp:
            save_file({"keys": self.keys.cpu().contiguous()}, str(tmp))
        atomic_write_text(directory / "retriever.json", json.dumps(self.describe()))

    @classmethod
    def load(cls, directory: str | Path) -> "TorchExactRetriever":
        directory = Path(directory)
        path = directory / "keys.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"index file {path} is missing: rebuild the database with `python -m raee.build_db`")
        meta = json.loads((directory / "retriever.json").read_text())
        try:
            keys = load_file(str(path))["keys"]
        except Exception as err:  # safetensors raises its own error types on damaged files
            raise ValueError(f"index file {path} is unreadable ({err}): rebuild the database with "
                             "`python -m raee.build_db`") from err
        out = cls(metric=meta["metric"])
        out.keys = keys
        return out

    def describe(self) -> dict[str, Any]:
        return {"type": "torch_exact", "metric": self.metric}
