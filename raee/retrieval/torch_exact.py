"""Exact search with a torch matmul + top-k: works everywhere (CPU or GPU, no FAISS needed) and
is the reference the FAISS retrievers are tested against.

On disk: ``keys.safetensors`` (the (N, D) keys) and ``retriever.json`` (metric, dim, ntotal, device).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from raee.atomic import atomic_path
from raee.errors import UserError
from raee.retrieval.base import REBUILD_HINT, Retriever, check_keys, open_index, write_meta

KEYS_FILE = "keys.safetensors"
#: score-matrix entries per query chunk (~128 MB of float32): bounds memory for large databases
CHUNK_ELEMENTS = 1 << 25


def resolve_device(device: str) -> torch.device:
    """"auto" -> the GPU when torch sees one, else the CPU; anything else as torch understands it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"retriever.device={device} but torch sees no GPU: use device=cpu or device=auto")
    return dev


class TorchExactRetriever(Retriever):
    """Brute-force search: ip = q @ K^T (top-k largest); l2 = |q|^2 - 2 q.K + |K|^2 (top-k smallest),
    the same expansion FAISS's flat L2 index uses, so both rank alike."""

    def __init__(self, metric: str = "ip", device: str = "cpu") -> None:
        super().__init__(metric)
        self.device_name = str(device)
        self.device = resolve_device(self.device_name)
        self._parts: list[torch.Tensor] = []  # keys added shard by shard, joined on first search
        self._keys = torch.zeros(0, 0, device=self.device)  # (N, D)
        self._sq_norms = torch.zeros(0, device=self.device)  # (N,) |K|^2 for l2

    @property
    def keys(self) -> torch.Tensor:
        """(N, D) all stored keys (joined once after shard-by-shard adds)."""
        if self._parts:
            self._keys = torch.cat([self._keys, *self._parts]) if self._keys.numel() else torch.cat(self._parts)
            self._parts = []
            self._sq_norms = (self._keys * self._keys).sum(1)
        return self._keys

    @property
    def ntotal(self) -> int:
        return int(self._keys.shape[0]) + sum(int(p.shape[0]) for p in self._parts)

    @property
    def dim(self) -> int | None:
        first = self._parts[0] if self._parts else self._keys
        return int(first.shape[1]) if self.ntotal else None

    def add(self, keys: np.ndarray) -> None:
        self._parts.append(torch.from_numpy(check_keys(keys, self.dim)).to(self.device))

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        keys = self.keys
        q_all = torch.from_numpy(queries).to(self.device)
        rows = max(1, CHUNK_ELEMENTS // max(1, self.ntotal))
        scores, ids = [], []
        for start in range(0, q_all.shape[0], rows):
            q = q_all[start:start + rows]
            if self.metric == "ip":
                s, i = (q @ keys.T).topk(k, dim=1)
            else:
                d = (q * q).sum(1, keepdim=True) - 2.0 * (q @ keys.T) + self._sq_norms
                s, i = d.clamp(min=0.0).topk(k, dim=1, largest=False)
            scores.append(s.cpu())
            ids.append(i.cpu())
        if not scores:  # zero queries
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return torch.cat(scores).numpy(), torch.cat(ids).numpy()

    def save(self, directory: str | Path) -> None:
        if self.ntotal == 0:
            raise ValueError("nothing to save: the retriever is empty (add() keys first)")
        directory = Path(directory)
        with atomic_path(directory / KEYS_FILE) as tmp:
            save_file({"keys": self.keys.detach().cpu().contiguous()}, str(tmp))
        write_meta(directory, self, device=self.device_name)

    @classmethod
    def load(cls, directory: str | Path, writable: bool = False, device: str | None = None) -> "TorchExactRetriever":
        """Read keys written by :meth:`save` (always into memory, so always ``writable``); ``device``
        overrides the saved one (a CPU machine can read a database built on a GPU: a saved "cuda"
        falls back to the CPU when no GPU is seen)."""
        path, meta = open_index(directory, KEYS_FILE)
        try:
            keys = load_file(str(path))["keys"]
        except Exception as err:  # safetensors raises its own error types on damaged files
            raise UserError(f"index file {path} is truncated or corrupt ({err}): {REBUILD_HINT}") from err
        if keys.ndim != 2 or int(keys.shape[0]) != meta.get("ntotal", keys.shape[0]) \
                or int(keys.shape[1]) != meta.get("dim", keys.shape[1]):
            raise UserError(f"index file {path} holds keys of shape {tuple(keys.shape)}, its metadata says "
                            f"({meta.get('ntotal')}, {meta.get('dim')}): {REBUILD_HINT}")
        if device is None:
            device = meta.get("device", "cpu")
            if str(device).startswith("cuda") and not torch.cuda.is_available():
                device = "cpu"
        out = cls(metric=meta.get("metric", "ip"), device=device)
        out.add(keys.numpy())
        return out

    def describe(self) -> dict[str, Any]:
        # the device is deliberately absent: the same keys on another device are the same index
        return {"type": "torch_exact", "metric": self.metric}
