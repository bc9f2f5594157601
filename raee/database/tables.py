"""Exit tables that live on disk: rows of memory-mapped shard files, read as torch tensors on demand.

A :class:`ShardedTable` stands in for an (N, ...) tensor of the exit database. Indexing it with
rows (an int, a slice, a list, an index tensor of any shape, a boolean mask) reads only those
rows from the memory-mapped shards and returns an ordinary torch tensor in the table's logical
dtype, so the aggregators' ``info.correct[ids]`` and ``info.probs[ids]`` keep working unchanged.
Whole-table operations (``.float()``, ``torch.equal(table, x)``, ...) read the whole table;
meant for small databases and notebooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

#: how stored values are turned into the logical dtype
DECODINGS = ("float", "complement", "int", "bits")


def _decoded_dtype(decode: str, stored: np.dtype) -> torch.dtype:
    if decode == "bits":
        return torch.bool
    if decode in ("float", "complement") or np.issubdtype(stored, np.floating):
        return torch.float32
    return torch.int64


class ShardedTable:
    """Rows 0..N-1 of one exit table, stored in consecutive shards (numpy arrays, usually memmaps).

    decode: "float" -> float32 (float32 keys), "complement" -> 1 - the stored value as float32
    (probabilities stored as float16 complements), "int" -> int64 (compact class
    ids; float32 for regression targets), "bits" -> bool (per-layer bits packed with
    ``np.packbits(..., axis=1, bitorder="little")``; ``columns`` gives the unpacked width).
    """

    def __init__(self, parts: Sequence[np.ndarray], decode: str, columns: int | None = None) -> None:
        if decode not in DECODINGS:
            raise ValueError(f"decode={decode!r} is not one of {DECODINGS}")
        if not parts:
            raise ValueError("a table needs at least one shard")
        if decode == "bits" and columns is None:
            raise ValueError("a bit-packed table needs its number of columns")
        self.parts = list(parts)
        self.decode = decode
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.stored_dtype = np.result_type(*[p.dtype for p in self.parts])
        row_shape = tuple(self.parts[0].shape[1:])
        self.row_shape = (int(columns),) if decode == "bits" else row_shape
        self.dtype = _decoded_dtype(decode, self.stored_dtype)
        for p in self.parts:
            if tuple(p.shape[1:]) != row_shape:
                raise ValueError(f"table shards have different row shapes: {tuple(p.shape[1:])} vs {row_shape}")

    # ------------------------------------------------------------------ tensor-like properties
    @property
    def shape(self) -> torch.Size:
        return torch.Size((int(self.offsets[-1]), *self.row_shape))

    @property
    def ndim(self) -> int:
        return 1 + len(self.row_shape)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def __repr__(self) -> str:
        return (f"ShardedTable(shape={tuple(self.shape)}, dtype={self.dtype}, stored={self.stored_dtype}, "
                f"shards={len(self.parts)})")

    # ------------------------------------------------------------------ reading rows
    def _rows(self, index: Any) -> np.ndarray:
        """Any row index -> int64 array of row numbers (its shape is the result's leading shape)."""
        n = len(self)
        if isinstance(index, slice):
            return np.arange(*index.indices(n), dtype=np.int64)
        if isinstance(index, torch.Tensor):
            index = index.detach().cpu().numpy()
        rows = np.asarray(index)
        if rows.dtype == np.bool_:
            if rows.shape != (n,):
                raise IndexError(f"a boolean row mask must have shape ({n},), got {rows.shape}")
            return np.flatnonzero(rows)
        if not np.issubdtype(rows.dtype, np.integer):
            raise IndexError(f"rows must be integers, a slice or a boolean mask, got dtype {rows.dtype}")
        rows = rows.astype(np.int64)
        if rows.size and (rows.min() < -n or rows.max() >= n):
            bad = int(rows.max()) if rows.max() >= n else int(rows.min())
            raise IndexError(f"row {bad} is out of range for a table of {n} rows")
        return np.where(rows < 0, rows + n, rows)

    def _gather(self, flat: np.ndarray) -> np.ndarray:
        """(M,) row numbers -> (M, *stored row shape) stored values, read shard by shard."""
        if len(self.parts) == 1:
            return np.asarray(self.parts[0][flat], dtype=self.stored_dtype)
        out = np.empty((len(flat), *self.parts[0].shape[1:]), dtype=self.stored_dtype)
        shard = np.searchsorted(self.offsets, flat, side="right") - 1
        for s in np.unique(shard):
            take = shard == s
            out[take] = self.parts[s][flat[take] - self.offsets[s]]
        return out

    def _decode(self, stored: np.ndarray) -> torch.Tensor:
        if self.decode == "bits":
            bits = np.unpackbits(stored, axis=-1, count=self.row_shape[0], bitorder="little")
            return torch.from_numpy(bits.astype(np.bool_))
        values = torch.from_numpy(np.ascontiguousarray(stored)).to(self.dtype)
        return 1.0 - values if self.decode == "complement" else values

    def __getitem__(self, index: Any) -> torch.Tensor:
        rest: tuple = ()
        if isinstance(index, tuple):
            index, rest = index[0], index[1:]
        rows = self._rows(index)
        values = self._decode(self._gather(rows.reshape(-1)))
        out = values.reshape(tuple(rows.shape) + self.row_shape)
        return out[(slice(None),) * rows.ndim + rest] if rest else out

    # ------------------------------------------------------------------ whole-table views (read everything)
    def tensor(self) -> torch.Tensor:
        """The whole table as one in-memory tensor (N, ...)."""
        return self[:]

    def numpy(self) -> np.ndarray:
        return self.tensor().numpy()

    def float(self) -> torch.Tensor:
        return self.tensor().float()

    def bool(self) -> torch.Tensor:
        return self.tensor().bool()

    def is_floating_point(self) -> bool:
        """As torch: True for float tables (probabilities, keys, regression values and targets)."""
        return self.dtype.is_floating_point

    def long(self) -> torch.Tensor:
        return self.tensor().long()

    def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.tensor().to(*args, **kwargs)

    def cpu(self) -> torch.Tensor:
        return self.tensor()

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        """torch functions on a table (torch.equal, torch.nonzero, ...) see its whole tensor."""
        def real(x: Any) -> Any:
            if isinstance(x, ShardedTable):
                return x.tensor()
            if isinstance(x, (list, tuple)):
                return type(x)(real(v) for v in x)
            return x

        return func(*real(args), **{k: real(v) for k, v in (kwargs or {}).items()})
