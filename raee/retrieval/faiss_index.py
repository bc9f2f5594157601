"""FAISS retrievers: exact (Flat) and approximate (HNSW, IVF, PQ, any index_factory string).

The GPU build is used when it is installed and a GPU is present; the CPU build otherwise.
nprobe (IVF) and efSearch (HNSW) are applied for real (the paper's scripts parsed nprobe and
never set it). The paper's notation ``HNSW32_PQ64`` is accepted and turned into FAISS's
``HNSW32,PQ64``.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from raee.atomic import atomic_path, atomic_write_text
from raee.retrieval.base import Retriever, check_keys


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError as err:
        raise ImportError("FAISS is not installed: pip install -e '.[cpu]' (or '.[gpu]' for the GPU build), "
                          "or use retriever=torch_exact") from err
    # flat search below this many queries skips BLAS; 16 made batch-256 search ~10x faster here
    faiss.cvar.distance_compute_blas_threshold = 16
    return faiss


def resolve_factory(factory: str, n: int, dim: int) -> str:
    """Paper notation -> FAISS notation; ``IVFauto`` -> IVF with nlist ~ 8 sqrt(N) (at most N / 39)."""
    spec = factory.strip()
    spec = re.sub(r"^(HNSW\d+)_(PQ\d+)", r"\1,\2", spec)  # HNSW32_PQ64 -> HNSW32,PQ64
    if "IVFauto" in spec:
        nlist = max(1, min(int(8 * math.sqrt(n)), n // 39 if n >= 39 else 1))
        spec = spec.replace("IVFauto", f"IVF{nlist}")
    for m in re.findall(r"PQ(\d+)", spec):
        if dim % int(m):
            divisors = [d for d in range(1, dim + 1) if dim % d == 0 and d <= int(m)]
            raise ValueError(f"retriever.factory '{factory}': PQ{m} needs the key dimension {dim} to be a multiple "
                             f"of {m}; use e.g. PQ{divisors[-1]}")
    return spec


class FaissRetriever(Retriever):
    def __init__(self, factory: str = "Flat", metric: str = "ip", nprobe: int | None = None,
                 ef_search: int | None = None, params: str | None = None, use_gpu: str | bool = "auto") -> None:
        """params: any further FAISS ParameterSpace settings, e.g. "k_factor_rf=4" for an RFlat re-ranker."""
        super().__init__(metric)
        self.params = params
        self.factory = factory
        self.nprobe = nprobe
        self.ef_search = ef_search
        self.use_gpu = use_gpu
        self.index: Any = None
        self.resolved: str | None = None

    @property
    def ntotal(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def _faiss_metric(self, faiss: Any) -> int:
        return faiss.METRIC_INNER_PRODUCT if self.metric == "ip" else faiss.METRIC_L2

    def _want_gpu(self, faiss: Any) -> bool:
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if self.use_gpu is True and gpus == 0:
            raise RuntimeError("retriever.use_gpu=true but FAISS sees no GPU (or this is the CPU build): "
                               "install faiss-gpu with pip install -e '.[gpu]', or set use_gpu=auto")
        return bool(gpus) and self.use_gpu in ("auto", True)

    def add(self, keys: np.ndarray) -> None:
        faiss = import_faiss()
        keys = check_keys(keys, self.index.d if self.index is not None else None)
        if self.index is None:
            self.resolved = resolve_factory(self.factory, keys.shape[0], keys.shape[1])
            index = faiss.index_factory(keys.shape[1], self.resolved, self._faiss_metric(faiss))
            if self._want_gpu(faiss):
                index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
            if not index.is_trained:
                index.train(keys)
            self.index = index
            self._apply_search_params()
        self.index.add(keys)

    def _apply_search_params(self) -> None:
        faiss = import_faiss()
        cpu_index = self.index
        params = []
        if self.nprobe is not None:
            params.append(f"nprobe={int(self.nprobe)}")
        if self.ef_search is not None:
            params.append(f"efSearch={int(self.ef_search)}")
        if self.params:
            params.append(str(self.params))
        if params and hasattr(faiss, "ParameterSpace") and not hasattr(cpu_index, "getDevice"):
            faiss.ParameterSpace().set_index_parameters(cpu_index, ",".join(params))
        elif params:  # GPU indexes take nprobe through GpuParameterSpace
            faiss.GpuParameterSpace().set_index_parameters(cpu_index, ",".join(params))

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if queries.shape[1] != self.index.d:
            raise ValueError(f"queries have dimension {queries.shape[1]} but the index holds {self.index.d}")
        return self.index.search(queries, k)

    def save(self, directory: str | Path) -> None:
        faiss = import_faiss()
        directory = Path(directory)
        index = self.index
        if hasattr(faiss, "index_gpu_to_cpu") and hasattr(index, "getDevice"):
            index = faiss.index_gpu_to_cpu(index)
        with atomic_path(directory / "index.faiss") as tmp:
            faiss.write_index(index, str(tmp))
        atomic_write_text(directory / "retriever.json", json.dumps(self.describe() | {
            "dim": int(self.index.d), "ntotal": self.ntotal, "resolved": self.resolved}))

    @classmethod
    def load(cls, directory: str | Path) -> "FaissRetriever":
        faiss = import_faiss()
        directory = Path(directory)
        path, meta_path = directory / "index.faiss", directory / "retriever.json"
        for p in (path, meta_path):
            if not p.exists():
                raise FileNotFoundError(f"index file {p} is missing: rebuild the database with `python -m raee.build_db`")
        meta = json.loads(meta_path.read_text())
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as err:
            raise ValueError(f"index file {path} is truncated or corrupt ({os.path.getsize(path)} bytes): rebuild "
                             "the database with `python -m raee.build_db`") from err
        if int(index.ntotal) != meta["ntotal"]:
            raise ValueError(f"index file {path} holds {index.ntotal} keys, its metadata says {meta['ntotal']}: "
                             "rebuild the database with `python -m raee.build_db`")
        out = cls(factory=meta["factory"], metric=meta["metric"], nprobe=meta.get("nprobe"),
                  ef_search=meta.get("ef_search"), params=meta.get("params"), use_gpu=meta.get("use_gpu", "auto"))
        out.resolved = meta.get("resolved")
        out.index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index) if out._want_gpu(faiss) else index
        out._apply_search_params()
        return out

    def describe(self) -> dict[str, Any]:
        return {"type": "faiss", "factory": self.factory, "metric": self.metric, "nprobe": self.nprobe,
                "ef_search": self.ef_search, "params": self.params, "use_gpu": self.use_gpu}
