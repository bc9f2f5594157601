"""FAISS retrievers: exact (Flat) and approximate (HNSW, IVF, PQ, any index_factory string).

- ``factory`` is a FAISS index_factory string. The RAEE paper's notation ``HNSW32_PQ64`` is
  accepted (turned into FAISS's ``HNSW32,PQ64``), and ``IVFauto`` picks nlist ~ 8 sqrt(N) as the
  paper's scripts do (capped at N / 39 so that k-means gets its 39 points per centroid).
- nprobe (IVF) and efSearch (HNSW, or the HNSW coarse quantizer of ``IVF..._HNSW32``) are
  applied for real (the paper's scripts parsed nprobe and never set it); a knob that does not
  fit the index is an error, not silently ignored.
- The GPU build is used when it is installed and FAISS sees a GPU (``use_gpu="auto"``).

On disk: ``index.faiss`` (faiss.write_index, always the CPU form) and ``retriever.json``
(factory, resolved factory, metric, dim, ntotal, nprobe, ef_search, params, use_gpu).
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from raee.atomic import atomic_path
from raee.retrieval.base import META_FILE, REBUILD_HINT, Retriever, check_keys, open_index, write_meta

INDEX_FILE = "index.faiss"
_BLAS_SET = False


def import_faiss() -> Any:
    """The faiss module (imported lazily: torch_exact works without it), tuned once per process."""
    global _BLAS_SET
    # faiss logs at INFO that its AVX2 build is missing before falling back: noise in every run
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        import faiss
    except ImportError as err:
        raise ImportError("FAISS is not installed: pip install -e '.[cpu]' (or '.[gpu]' for the GPU build), "
                          "or use retriever=torch_exact") from err
    if not _BLAS_SET:
        # below this many queries per call flat search skips BLAS; 16 made batch-256 search ~10x faster
        faiss.cvar.distance_compute_blas_threshold = 16
        _BLAS_SET = True
    return faiss


def auto_nlist(n: int) -> int:
    """nlist for ``IVFauto``: about 8 sqrt(N) (the paper's scripts), at most N // 39, at least 1."""
    return max(1, min(int(round(8 * math.sqrt(n))), n // 39))


def _effective_dim(spec: str, dim: int) -> int:
    """Key dimension after a leading transform (OPQm_d, PCAd, PCAWd, PCARd, ...) in the factory string."""
    out = dim
    for part in spec.split(","):
        m = re.fullmatch(r"OPQ\d+(?:_(\d+))?", part)
        if m:
            out = int(m.group(1)) if m.group(1) else out
            continue
        m = re.fullmatch(r"(?:PCAW?R?|RR|ITQ)(\d+)(?:,.*)?", part)
        if m:
            out = int(m.group(1))
    return out


def resolve_factory(factory: str, n: int, dim: int) -> str:
    """The factory string FAISS is given for ``n`` keys of dimension ``dim``.

    - ``HNSW32_PQ64`` (paper) -> ``HNSW32,PQ64`` (FAISS); ``IVF256_HNSW32,...`` is FAISS's own
      notation for an HNSW coarse quantizer and is kept;
    - ``IVFauto`` -> ``IVF{auto_nlist(n)}``; an explicit nlist above n is refused;
    - PQ sizes are checked (m must divide the dimension; 2**nbits codewords need that many keys);
    - PQ gets FAISS's ``np`` suffix: the factory otherwise runs "polysemous" training, which only
      serves Hamming-filtered search (unused here) and took minutes instead of a second here.
    """
    spec = str(factory).strip().replace(" ", "")
    if not spec:
        raise ValueError("retriever.factory is empty: use e.g. Flat, HNSW32, IVFauto,Flat or HNSW32_PQ64")
    spec = re.sub(r"(^|,)(HNSW\d*)_(?=[A-Za-z])", r"\1\2,", spec)
    spec = spec.replace("IVFauto", f"IVF{auto_nlist(n)}")
    for nlist in re.findall(r"(?<![A-Za-z])IVF(\d+)", spec):
        if int(nlist) > n:
            raise ValueError(f"retriever.factory '{factory}': IVF{nlist} needs at least {nlist} keys to train, the "
                             f"database has {n}; use IVFauto (nlist {auto_nlist(n)} here) or at most IVF{n // 39 or 1}")
    eff_dim = _effective_dim(spec, dim)
    for m_str, nbits_str in re.findall(r"(?<![A-Za-z])PQ(\d+)(?:x(\d+))?", spec):
        m, nbits = int(m_str), int(nbits_str or 8)
        if m == 0 or eff_dim % m:
            valid = [d for d in range(1, eff_dim + 1) if eff_dim % d == 0]
            below = [d for d in valid if d <= max(m, 1)]
            raise ValueError(f"retriever.factory '{factory}': PQ{m} splits the {eff_dim}-dimensional keys into {m} "
                             f"parts, so the dimension must be a multiple of {m}; use e.g. PQ{below[-1]} "
                             f"(valid m for dimension {eff_dim}: {valid})")
        if n < 2 ** nbits:
            raise ValueError(f"retriever.factory '{factory}': PQ{m} with {nbits}-bit codes needs at least "
                             f"{2 ** nbits} keys to train its codebooks, the database has {n}; use more training "
                             f"examples, fewer bits (PQ{m}x{max(1, int(math.log2(n)))}) or factory=Flat / HNSW32")
    # no polysemous training (see above); fast-scan ("fs") and explicit "np" forms are left alone
    return re.sub(r"(?<![A-Za-z])(PQ\d+(?:x\d+)?)(?![\dxnf])", r"\1np", spec)


def _faiss_message(err: Exception) -> str:
    """The readable tail of a FAISS C++ error ("Error in ... at file.cpp:624: what went wrong")."""
    text = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    if ".cpp:" in text:
        text = text.split(".cpp:", 1)[1].split(": ", 1)[-1]
    return text


def _normalise_use_gpu(use_gpu: Any) -> str | bool:
    if isinstance(use_gpu, bool):
        return use_gpu
    text = str(use_gpu).strip().lower()
    if text in ("auto", "true", "false"):
        return {"auto": "auto", "true": True, "false": False}[text]
    raise ValueError(f"retriever.use_gpu={use_gpu!r} is not one of auto, true, false")


def _parse_params(params: str | None) -> list[tuple[str, float]]:
    """"k_factor_rf=4,efSearch=64" -> [("k_factor_rf", 4.0), ("efSearch", 64.0)]."""
    out = []
    for item in filter(None, (p.strip() for p in str(params or "").split(","))):
        name, sep, value = item.partition("=")
        try:
            out.append((name.strip(), float(value)))
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ValueError(f"retriever.params={params!r}: expected comma-separated name=number settings, "
                             "e.g. k_factor_rf=4")
    return out


class FaissRetriever(Retriever):
    """A FAISS index built with ``index_factory`` (see the module docstring for the knobs)."""

    def __init__(self, factory: str = "Flat", metric: str = "ip", nprobe: int | None = None,
                 ef_search: int | None = None, params: str | None = None, use_gpu: str | bool = "auto") -> None:
        """params: further FAISS ParameterSpace settings, e.g. "k_factor_rf=4" for an RFlat re-ranker."""
        super().__init__(metric)
        for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            if value is not None and int(value) < 1:
                raise ValueError(f"retriever.{name}={value} must be at least 1 (or null for FAISS's default)")
        _parse_params(params)  # fail early on a malformed string
        self.factory = str(factory)
        self.nprobe = None if nprobe is None else int(nprobe)
        self.ef_search = None if ef_search is None else int(ef_search)
        self.params = params or None
        self.use_gpu = _normalise_use_gpu(use_gpu)
        self.index: Any = None
        self.resolved: str | None = None
        self._gpu_res: Any = None  # StandardGpuResources must outlive the GPU index

    # ------------------------------------------------------------------ properties
    @property
    def ntotal(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    @property
    def dim(self) -> int | None:
        return None if self.index is None else int(self.index.d)

    @property
    def on_gpu(self) -> bool:
        return self._gpu_res is not None

    # ------------------------------------------------------------------ building
    def _faiss_metric(self, faiss: Any) -> int:
        return faiss.METRIC_INNER_PRODUCT if self.metric == "ip" else faiss.METRIC_L2

    def _want_gpu(self, faiss: Any) -> bool:
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if self.use_gpu is True and gpus == 0:
            raise RuntimeError("retriever.use_gpu=true but FAISS sees no GPU (or this is the CPU build): install "
                               "the GPU build with pip install -e '.[gpu]', or set retriever.use_gpu=auto")
        return gpus > 0 and self.use_gpu in ("auto", True)

    def _maybe_to_gpu(self, faiss: Any, index: Any) -> Any:
        """The index on GPU 0 when wanted; with use_gpu=auto an index type the GPU lacks (HNSW) stays on the CPU."""
        if not self._want_gpu(faiss):
            return index
        res = faiss.StandardGpuResources()
        try:
            gpu_index = faiss.index_cpu_to_gpu(res, 0, index)
        except RuntimeError as err:
            if self.use_gpu is True:
                raise ValueError(f"retriever.factory '{self.factory}' cannot run on the GPU ({_faiss_message(err)}): "
                                 "use an IVF or Flat index, or set retriever.use_gpu=auto to keep this one on the "
                                 "CPU") from err
            warnings.warn(f"FAISS index '{self.resolved}' has no GPU version; searching on the CPU", stacklevel=3)
            return index
        self._gpu_res = res
        return gpu_index

    def add(self, keys: np.ndarray) -> None:
        """Add (N, D) keys; the first call builds the index and trains it on these keys if it needs training."""
        faiss = import_faiss()
        keys = check_keys(keys, self.dim)
        if self.index is None:
            self.resolved = resolve_factory(self.factory, keys.shape[0], keys.shape[1])
            try:
                index = faiss.index_factory(keys.shape[1], self.resolved, self._faiss_metric(faiss))
            except RuntimeError as err:
                raise ValueError(f"retriever.factory '{self.factory}' (FAISS: '{self.resolved}') is not a valid "
                                 f"FAISS index_factory string ({_faiss_message(err)})") from err
            index = self._maybe_to_gpu(faiss, index)
            if not index.is_trained:
                try:
                    index.train(keys)
                except RuntimeError as err:
                    raise ValueError(f"training FAISS index '{self.resolved}' on {keys.shape[0]} keys failed "
                                     f"({_faiss_message(err)}): use more training examples or a smaller index "
                                     "(Flat, HNSW32)") from err
            self.index = index
            self._apply_search_params()
        self.index.add(keys)

    def _apply_search_params(self) -> None:
        """Set nprobe / efSearch / params on the index itself (ParameterSpace reaches through wrappers)."""
        faiss = import_faiss()
        settings: list[tuple[str, str, float]] = []  # (knob for errors, FAISS name, value)
        if self.nprobe is not None:
            settings.append(("nprobe", "nprobe", self.nprobe))
        if self.ef_search is not None:
            if self.on_gpu:  # GPU indexes have no HNSW (an HNSW quantizer becomes a flat one there)
                warnings.warn("retriever.ef_search has no effect on a GPU FAISS index; ignored", stacklevel=3)
            else:
                # IVF..._HNSW32: efSearch belongs to the coarse quantizer
                ivf = faiss.try_extract_index_ivf(self.index)
                settings.append(("ef_search", "quantizer_efSearch" if ivf is not None else "efSearch",
                                 self.ef_search))
        settings += [("params", name, value) for name, value in _parse_params(self.params)]
        space = faiss.GpuParameterSpace() if self.on_gpu else faiss.ParameterSpace()
        for knob, name, value in settings:
            try:
                space.set_index_parameter(self.index, name, float(value))
            except RuntimeError as err:
                raise ValueError(f"retriever.{knob}: FAISS cannot set {name}={value:g} on index '{self.resolved}' "
                                 f"({_faiss_message(err)}); nprobe is for IVF indexes, ef_search for "
                                 f"HNSW ones: set retriever.{knob}=null for this factory") from err

    # ------------------------------------------------------------------ search
    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> None:
        if self.index is None:
            raise ValueError("nothing to save: the retriever is empty (add() keys first)")
        faiss = import_faiss()
        directory = Path(directory)
        index = faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index
        with atomic_path(directory / INDEX_FILE) as tmp:
            faiss.write_index(index, str(tmp))
        write_meta(directory, self, resolved=self.resolved)

    @classmethod
    def load(cls, directory: str | Path, use_gpu: str | bool | None = None) -> "FaissRetriever":
        """Read an index written by :meth:`save` (``use_gpu`` overrides the saved setting)."""
        faiss = import_faiss()
        directory = Path(directory)
        path, meta = open_index(directory, INDEX_FILE)
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as err:
            raise ValueError(f"index file {path} is truncated or corrupt ({path.stat().st_size} bytes, FAISS: "
                             f"{_faiss_message(err)}): {REBUILD_HINT}") from err
        found = {"ntotal": int(index.ntotal), "dim": int(index.d)}
        for field, value in found.items():
            if field in meta and meta[field] != value:
                raise ValueError(f"index file {path} holds {field}={value}, its metadata {directory / META_FILE} says "
                                 f"{meta[field]}: {REBUILD_HINT}")
        try:
            out = cls(factory=meta["factory"], metric=meta["metric"], nprobe=meta.get("nprobe"),
                      ef_search=meta.get("ef_search"), params=meta.get("params"),
                      use_gpu=meta.get("use_gpu", "auto") if use_gpu is None else use_gpu)
        except KeyError as err:
            raise ValueError(f"index metadata {directory / META_FILE} lacks {err}: {REBUILD_HINT}") from err
        if int(index.metric_type) != out._faiss_metric(faiss):
            raise ValueError(f"index file {path} uses another metric than its metadata ({out.metric}): {REBUILD_HINT}")
        out.resolved = meta.get("resolved")
        out.index = out._maybe_to_gpu(faiss, index)
        out._apply_search_params()
        return out

    def describe(self) -> dict[str, Any]:
        return {"type": "faiss", "factory": self.factory, "metric": self.metric, "nprobe": self.nprobe,
                "ef_search": self.ef_search, "params": self.params, "use_gpu": self.use_gpu}
