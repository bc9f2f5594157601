"""FAISS retrievers: exact (Flat) and approximate (HNSW, IVF, PQ, any index_factory string).

- ``factory`` is a FAISS index_factory string. The RAEE paper's notation ``HNSW32_PQ64`` is
  accepted (turned into FAISS's ``HNSW32,PQ64``), and ``IVFauto`` picks nlist ~ 8 sqrt(N) as the
  paper's scripts do (capped at N / 39 so that k-means gets its 39 points per centroid).
- nprobe (IVF), efSearch (HNSW, or the HNSW coarse quantizer of ``IVF..._HNSW32``) and k_factor
  (``Refine(...)``/``RFlat``: the approximate index returns k_factor x k candidates, re-ranked with
  the finer codes; FAISS's own default of 1 re-ranks only the k it returns) are set through
  ``faiss.ParameterSpace`` whenever the index is built or loaded (the paper's scripts parsed
  nprobe and never set it); a knob that does not fit the index is an error, not silently ignored.
- Indexes that train (IVF, PQ, SQ) are trained on a sample of the keys: :meth:`FaissRetriever.train`
  takes it (the exit database draws a seeded sample of ``train_size`` keys, default
  :func:`auto_train_size`), then keys are added shard by shard.
- ``storage`` says where the index lives when searched: ``memory`` (read whole), ``mmap``
  (``faiss.read_index`` with ``IO_FLAG_MMAP``/``IO_FLAG_MMAP_IFC``: inverted lists and flat codes
  are paged in from the file on demand, read-only) or ``ondisk`` (IVF only: FAISS's
  ``OnDiskInvertedLists``, filled shard by shard while building, so neither building nor searching
  needs the lists in memory; the file is compacted with ``merge_from_multiple`` when saved).
- The GPU build is used when it is installed and FAISS sees a GPU (``use_gpu="auto"``); with
  several GPUs the index is split over all of them (``GpuMultipleClonerOptions.shard``, FAISS's
  IndexShards). storage=ondisk builds on the CPU and is copied to the GPU(s) when loaded.

On disk: ``index.faiss`` (faiss.write_index, always the CPU form), ``index.ivfdata`` (storage=ondisk)
and ``retriever.json`` (factory, resolved factory, metric, dim, ntotal, nprobe, ef_search, k_factor,
params, use_gpu, storage, train_size).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from raee.atomic import atomic_path
from raee.errors import MissingFileError, MissingPackageError, UserError
from raee.retrieval.base import META_FILE, REBUILD_HINT, Retriever, check_keys, open_index, write_meta

INDEX_FILE = "index.faiss"
#: storage=ondisk: the inverted lists, beside INDEX_FILE
DATA_FILE = "index.ivfdata"
STORAGES = ("memory", "mmap", "ondisk")
#: auto_train_size: k-means points per inverted list, floor (PQ/SQ codebooks) and memory cap of the sample
TRAIN_POINTS_PER_LIST = 64
MIN_TRAIN_SAMPLE = 65536
MAX_TRAIN_SAMPLE_BYTES = 1 << 30
#: threads FAISS's on-disk lists start on every search call to page the probed lists in ahead (FAISS
#: default 32). The lists file is memory-mapped and pages in on demand anyway; for batch-1 queries the
#: threads cost more than the search (2-3x the wall time, 100k keys, nprobe 16), so none are started.
ONDISK_PREFETCH_THREADS = 0
#: flat distances go through BLAS from this many queries per call, FAISS's SIMD loop below it. FAISS 1.15
#: switches on queries x dimension (``distance_compute_blas_threshold``, default 128000: 333 queries of
#: 384-d keys). Measured (2026-12-06, 1 thread, 1,269 to 100k keys of 384 and 576 dims): BLAS costs 2-5x
#: more at 1 query, is even at about 4 and 1.5-3x faster from 8, and 2.6-9x faster at 256 queries.
BLAS_MIN_QUERIES = 4
_LOADER_QUIET = False


def import_faiss() -> Any:
    """The faiss module (imported lazily: torch_exact works without it)."""
    global _LOADER_QUIET
    if not _LOADER_QUIET:  # once: setLevel clears every logger's cache, too slow for each search
        # faiss logs at INFO that its AVX2 build is missing before falling back: noise in every run
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)
        _LOADER_QUIET = True
    try:
        import faiss
    except ImportError as err:
        raise MissingPackageError("FAISS is not installed: pip install -e '.[cpu]' (or '.[gpu]' for the GPU build), "
                                  "or use retriever=torch_exact") from err
    return faiss


def auto_nlist(n: int) -> int:
    """nlist for ``IVFauto``: about 8 sqrt(N) (the paper's scripts), at most N // 39, at least 1."""
    return max(1, min(int(round(8 * math.sqrt(n))), n // 39))


def auto_train_size(total: int, dim: int, nlist: int) -> int:
    """Keys to train an index on: 64 per inverted list (FAISS wants 39 to 256), at least 65536 (what
    FAISS's PQ/SQ training uses at most), never more than ``total`` nor 1 GiB of float32 keys."""
    cap = max(1, MAX_TRAIN_SAMPLE_BYTES // (4 * dim))
    return int(min(total, cap, max(TRAIN_POINTS_PER_LIST * nlist, MIN_TRAIN_SAMPLE)))


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
        raise UserError("retriever.factory is empty: use e.g. Flat, HNSW32, IVFauto,Flat or HNSW32_PQ64")
    spec = re.sub(r"(^|,)(HNSW\d*)_(?=[A-Za-z])", r"\1\2,", spec)
    spec = spec.replace("IVFauto", f"IVF{auto_nlist(n)}")
    for nlist in re.findall(r"(?<![A-Za-z])IVF(\d+)", spec):
        if int(nlist) > n:
            raise UserError(f"retriever.factory '{factory}': IVF{nlist} needs at least {nlist} keys to train, the "
                            f"database has {n}; use IVFauto (nlist {auto_nlist(n)} here) or at most IVF{n // 39 or 1}")
    eff_dim = _effective_dim(spec, dim)
    for m_str, nbits_str in re.findall(r"(?<![A-Za-z])PQ(\d+)(?:x(\d+))?", spec):
        m, nbits = int(m_str), int(nbits_str or 8)
        if m == 0 or eff_dim % m:
            valid = [d for d in range(1, eff_dim + 1) if eff_dim % d == 0]
            below = [d for d in valid if d <= max(m, 1)]
            raise UserError(f"retriever.factory '{factory}': PQ{m} splits the {eff_dim}-dimensional keys into {m} "
                            f"parts, so the dimension must be a multiple of {m}; use e.g. PQ{below[-1]} "
                            f"(valid m for dimension {eff_dim}: {valid})")
        if n < 2 ** nbits:
            raise UserError(f"retriever.factory '{factory}': PQ{m} with {nbits}-bit codes needs at least "
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
    raise UserError(f"retriever.use_gpu={use_gpu!r} is not one of auto, true, false")


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
            raise UserError(f"retriever.params={params!r}: expected comma-separated name=number settings, "
                            "e.g. k_factor_rf=4")
    return out


class FaissRetriever(Retriever):
    """A FAISS index built with ``index_factory`` (see the module docstring for the knobs)."""

    def __init__(self, factory: str = "Flat", metric: str = "ip", nprobe: int | None = None,
                 ef_search: int | None = None, params: str | None = None, use_gpu: str | bool = "auto",
                 storage: str = "memory", train_size: int | None = None, k_factor: int | None = None) -> None:
        """k_factor: re-ranked candidates per neighbour asked for (Refine/RFlat factories only).
        params: further FAISS ParameterSpace settings, e.g. "max_codes=4096".
        storage: "memory", "mmap" or "ondisk" (see the module docstring).
        train_size: keys sampled to train the index (null: :func:`auto_train_size`)."""
        super().__init__(metric)
        for name, value in (("nprobe", nprobe), ("ef_search", ef_search), ("train_size", train_size),
                            ("k_factor", k_factor)):
            if value is not None and int(value) < 1:
                raise UserError(f"retriever.{name}={value} must be at least 1 (or null for the default)")
        if storage not in STORAGES:
            raise UserError(f"retriever.storage={storage!r} is not one of {STORAGES}")
        _parse_params(params)  # fail early on a malformed string
        self.factory = str(factory)
        self.nprobe = None if nprobe is None else int(nprobe)
        self.ef_search = None if ef_search is None else int(ef_search)
        self.k_factor = None if k_factor is None else int(k_factor)
        self.params = params or None
        self.use_gpu = _normalise_use_gpu(use_gpu)
        self.storage = storage
        self.train_size_setting = None if train_size is None else int(train_size)
        #: where storage=ondisk keeps its inverted lists while keys are added (default: a temporary folder)
        self.workdir: Path | None = None
        self.index: Any = None
        self.resolved: str | None = None
        self._gpu_res: list[Any] | None = None  # GPU resources must outlive the GPU index
        self._read_only = False  # a memory-mapped index: FAISS aborts the process on add, so we refuse first
        self._delta: Any = None  # storage=ondisk: lists of keys added since the last merge

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

    def _new_index(self, faiss: Any, total: int, dim: int) -> Any:
        """An empty (untrained) index for ``total`` keys of dimension ``dim``; sets :attr:`resolved`."""
        self.resolved = resolve_factory(self.factory, total, dim)
        try:
            index = faiss.index_factory(dim, self.resolved, self._faiss_metric(faiss))
        except RuntimeError as err:
            raise UserError(f"retriever.factory '{self.factory}' (FAISS: '{self.resolved}') is not a valid "
                            f"FAISS index_factory string ({_faiss_message(err)})") from err
        if int(index.metric_type) != self._faiss_metric(faiss):
            raise UserError(f"FAISS builds '{self.resolved}' with the L2 metric only (it ignores "
                            f"retriever.metric={self.metric}): set retriever.metric=l2 (on L2-normalised keys it "
                            "ranks neighbours like inner product)")
        if self.storage == "ondisk" and faiss.try_extract_index_ivf(index) is None:
            raise UserError(f"retriever.storage=ondisk keeps FAISS inverted lists on disk, but factory "
                            f"'{self.factory}' has none: use an IVF factory (e.g. IVFauto,PQ48 or IVF4096,Flat) or "
                            "storage=memory / mmap")
        return index

    def train_size(self, total: int, dim: int) -> int:
        faiss = import_faiss()
        index = self._new_index(faiss, total, dim)
        if index.is_trained:
            return 0
        if self.train_size_setting is not None:
            return min(total, self.train_size_setting)
        ivf = faiss.try_extract_index_ivf(index)
        return auto_train_size(total, dim, 0 if ivf is None else int(ivf.nlist))

    def train(self, sample: np.ndarray, total: int) -> None:
        """Create the index for ``total`` keys and train it on ``sample`` (S, D) (the streaming build)."""
        if self.index is not None:
            raise ValueError("train() must come before the first add(): this index already holds keys")
        faiss = import_faiss()
        sample = check_keys(sample)
        index = self._new_index(faiss, max(int(total), len(sample)), sample.shape[1])
        self._train(index, sample)
        self._install(faiss, index)

    def _train(self, index: Any, sample: np.ndarray) -> None:
        if index.is_trained:
            return
        try:
            index.train(sample)
        except RuntimeError as err:
            raise UserError(f"training FAISS index '{self.resolved}' on {sample.shape[0]} keys failed "
                            f"({_faiss_message(err)}): use more training examples or a smaller index "
                            "(Flat, HNSW32)") from err

    def _install(self, faiss: Any, index: Any) -> None:
        """Make a trained, empty index the live one (on the GPU(s) when wanted; storage=ondisk stays
        on the CPU while keys are added, see :meth:`_add_on_disk`)."""
        if self.storage != "ondisk":
            index = self._maybe_to_gpu(faiss, index)
        self.index = index
        self._apply_search_params()

    def _work_file(self) -> Path:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="raee-ondisk-"))
            weakref.finalize(self, shutil.rmtree, self.workdir, True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="work-", suffix=f".{DATA_FILE}", dir=self.workdir)
        os.close(fd)
        return Path(path)

    def _want_gpu(self, faiss: Any) -> bool:
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if self.use_gpu is True and gpus == 0:
            raise UserError("retriever.use_gpu=true but FAISS sees no GPU (or this is the CPU build): install "
                            "the GPU build with pip install -e '.[gpu]', or set retriever.use_gpu=auto")
        return gpus > 0 and self.use_gpu in ("auto", True)

    def _maybe_to_gpu(self, faiss: Any, index: Any) -> Any:
        """The index on the GPU when wanted: on GPU 0, or split over every visible GPU (FAISS's own
        sharding: each GPU holds a share of the keys, results are merged) when there are several.
        With use_gpu=auto an index type the GPU lacks (HNSW) stays on the CPU."""
        if not self._want_gpu(faiss):
            return index
        gpus = int(faiss.get_num_gpus())
        resources = [faiss.StandardGpuResources() for _ in range(gpus)]
        try:
            if gpus > 1:
                options = faiss.GpuMultipleClonerOptions()
                options.shard = True  # split the keys over the GPUs instead of copying all of them to each
                gpu_index = faiss.index_cpu_to_gpu_multiple_py(resources, index, options)
            else:
                gpu_index = faiss.index_cpu_to_gpu(resources[0], 0, index)
        except RuntimeError as err:
            if self.use_gpu is True:
                raise UserError(f"retriever.factory '{self.factory}' cannot run on the GPU ({_faiss_message(err)}): "
                                "use an IVF or Flat index, or set retriever.use_gpu=auto to keep this one on the "
                                "CPU") from err
            warnings.warn(f"FAISS index '{self.resolved}' has no GPU version; searching on the CPU", stacklevel=3)
            return index
        self._gpu_res = resources
        return gpu_index

    def add(self, keys: np.ndarray) -> None:
        """Add (N, D) keys, shard after shard if need be; without a :meth:`train` call the first keys
        added build the index and train it."""
        faiss = import_faiss()
        keys = check_keys(keys, self.dim)
        if self.index is None:
            index = self._new_index(faiss, keys.shape[0], keys.shape[1])
            self._train(index, keys)
            self._install(faiss, index)
        if self._read_only:
            raise ValueError(f"this FAISS index was loaded read-only (retriever.storage={self.storage}): keys cannot "
                             "be added to it; load it with FaissRetriever.load(directory, writable=True)")
        if self.storage == "ondisk" and not self.on_gpu:
            self._add_on_disk(faiss, keys)
        else:
            self.index.add(keys)

    def _add_on_disk(self, faiss: Any, keys: np.ndarray) -> None:
        """Encode keys into a fresh on-disk "delta" list file, merged into the main lists on search/save.

        Why not add to the main lists in place: FAISS 1.15's OnDiskInvertedLists returns wrong ids
        after adding to lists written by merge_from_multiple (what saving and loading produce).
        The IVF's lists are swapped for the delta while the whole index (any wrapper: refine,
        pre-transform) adds, so ids continue from ntotal and wrappers stay in step.
        """
        ivf = faiss.extract_index_ivf(self.index)
        if self._delta is None:
            self._delta = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(self._work_file()))
        main, owned = ivf.invlists, ivf.own_invlists
        ivf.own_invlists = False  # so that swapping in the delta does not free the main lists
        ivf.replace_invlists(self._delta, False)
        try:
            with _c_stdout_silenced():  # on-disk lists print a line each time their file grows
                self.index.add(keys)
        finally:
            ivf.replace_invlists(main, owned)

    def _merge_lists(self, faiss: Any, target: Path, index: Any = None) -> None:
        """Write the main lists of ``index`` (default: the live one) plus the delta into one compact
        on-disk file ``target`` (FAISS's merge_from_multiple) and search from it; the superseded work
        files are removed."""
        ivf = faiss.extract_index_ivf(self.index if index is None else index)
        old = faiss.downcast_InvertedLists(ivf.invlists)
        old_file = Path(old.filename) if isinstance(old, faiss.OnDiskInvertedLists) else None
        if self._delta is None and old_file == target:
            return
        sources = faiss.InvertedListsPtrVector()
        sources.push_back(ivf.invlists)
        if self._delta is not None:
            sources.push_back(self._delta)
        with atomic_path(target) as tmp:
            merged = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(tmp))
            with _c_stdout_silenced():
                merged.merge_from_multiple(sources.data(), sources.size(), False)
            merged.read_only = True  # never added to in place (see _add_on_disk)
            merged.prefetch_nthread = ONDISK_PREFETCH_THREADS
            ivf.replace_invlists(merged, True)  # frees the old main lists
            merged.this.disown()
        merged.filename = str(target)
        for work in (old_file, Path(self._delta.filename) if self._delta is not None else None):
            if work is not None and work != target and self.workdir is not None and work.parent == self.workdir:
                work.unlink(missing_ok=True)
        self._delta = None

    def _apply_search_params(self) -> None:
        """Set nprobe / efSearch / k_factor / params on the index itself (ParameterSpace reaches through wrappers)."""
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
        if self.k_factor is not None:
            settings.append(("k_factor", "k_factor_rf", self.k_factor))
        settings += [("params", name, value) for name, value in _parse_params(self.params)]
        space = faiss.GpuParameterSpace() if self.on_gpu else faiss.ParameterSpace()
        for knob, name, value in settings:
            try:
                space.set_index_parameter(self.index, name, float(value))
            except RuntimeError as err:
                raise UserError(f"retriever.{knob}: FAISS cannot set {name}={value:g} on index '{self.resolved}' "
                                f"({_faiss_message(err)}); nprobe is for IVF indexes, ef_search for "
                                f"HNSW ones, k_factor for Refine(...)/RFlat ones: set retriever.{knob}=null "
                                "for this factory") from err

    # ------------------------------------------------------------------ search
    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = import_faiss()
        if self._delta is not None:
            self._merge_lists(faiss, self._work_file())
        # a process-wide FAISS setting, set for this index's key width before every search (cheap)
        faiss.cvar.distance_compute_blas_threshold = BLAS_MIN_QUERIES * queries.shape[1]
        return self.index.search(queries, k)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> None:
        """Write ``index.faiss`` (and, for storage=ondisk, the compacted lists ``index.ivfdata``) and
        ``retriever.json`` into ``directory``, file by file atomically."""
        if self.index is None:
            raise ValueError("nothing to save: the retriever is empty (add() keys first)")
        faiss = import_faiss()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        index = faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index
        if self.storage == "ondisk":
            self._merge_lists(faiss, directory / DATA_FILE, index)  # (a CPU copy when on the GPU: no delta)
        with atomic_path(directory / INDEX_FILE) as tmp:
            faiss.write_index(index, str(tmp))
        write_meta(directory, self, resolved=self.resolved)

    @classmethod
    def load(cls, directory: str | Path, writable: bool = False,
             use_gpu: str | bool | None = None) -> "FaissRetriever":
        """Read an index written by :meth:`save` (``use_gpu`` overrides the saved setting).

        storage=mmap maps the file read-only unless ``writable`` (then it is read into memory, so that
        keys can be added); storage=ondisk maps ``index.ivfdata`` read-only (added keys go to a new
        file; :meth:`save` writes the merged lists) and is kept on the CPU when ``writable``.
        """
        faiss = import_faiss()
        directory = Path(directory)
        path, meta = open_index(directory, INDEX_FILE)
        try:
            out = cls(factory=meta["factory"], metric=meta["metric"], nprobe=meta.get("nprobe"),
                      ef_search=meta.get("ef_search"), k_factor=meta.get("k_factor"), params=meta.get("params"),
                      use_gpu=meta.get("use_gpu", "auto") if use_gpu is None else use_gpu,
                      storage=meta.get("storage", "memory"), train_size=meta.get("train_size"))
        except KeyError as err:
            raise UserError(f"index metadata {directory / META_FILE} lacks {err}: {REBUILD_HINT}") from err
        out.resolved = meta.get("resolved")
        flags = 0
        if out.storage == "mmap" and not writable:
            # IVF: the inverted lists are mapped; otherwise the flat codes (Flat, PQ, SQ, HNSW's storage)
            flags = faiss.IO_FLAG_MMAP if "IVF" in str(out.resolved) else faiss.IO_FLAG_MMAP_IFC
        elif out.storage == "ondisk":
            flags = faiss.IO_FLAG_SKIP_IVF_DATA  # the lists are mapped below, from this directory
        try:
            index = faiss.read_index(str(path), flags)
        except RuntimeError as err:
            raise UserError(f"index file {path} is truncated or corrupt ({path.stat().st_size} bytes, FAISS: "
                            f"{_faiss_message(err)}): {REBUILD_HINT}") from err
        if out.storage == "ondisk":
            _map_lists(faiss, index, directory / DATA_FILE)
        found = {"ntotal": int(index.ntotal), "dim": int(index.d)}
        for field, value in found.items():
            if field in meta and meta[field] != value:
                raise UserError(f"index file {path} holds {field}={value}, its metadata {directory / META_FILE} says "
                                f"{meta[field]}: {REBUILD_HINT}")
        if int(index.metric_type) != out._faiss_metric(faiss):
            raise UserError(f"index file {path} uses another metric than its metadata ({out.metric}): {REBUILD_HINT}")
        out._read_only = out.storage == "mmap" and not writable
        out.index = index if writable and out.storage == "ondisk" else out._maybe_to_gpu(faiss, index)
        out._apply_search_params()
        return out

    def describe(self) -> dict[str, Any]:
        return {"type": "faiss", "factory": self.factory, "metric": self.metric, "nprobe": self.nprobe,
                "ef_search": self.ef_search, "k_factor": self.k_factor, "params": self.params, "use_gpu": self.use_gpu,
                "storage": self.storage, "train_size": self.train_size_setting}


def _map_lists(faiss: Any, index: Any, data: Path) -> None:
    """Point an index read with IO_FLAG_SKIP_IVF_DATA at its on-disk lists file and map it (the file
    moved with its database directory; FAISS's IO_FLAG_ONDISK_SAME_DIR does the same but prints a line)."""
    ivf = faiss.extract_index_ivf(index)
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    if not isinstance(lists, faiss.OnDiskInvertedLists):
        raise UserError(f"{data.parent / INDEX_FILE} has in-memory inverted lists but its metadata says "
                        f"storage=ondisk: {REBUILD_HINT}")
    if not data.exists():
        raise MissingFileError(f"index file {data} is missing: {REBUILD_HINT}")
    if data.stat().st_size < int(lists.totsize):
        raise UserError(f"index file {data} is truncated or corrupt ({data.stat().st_size} bytes, the index expects "
                        f"{int(lists.totsize)}): {REBUILD_HINT}")
    lists.filename = str(data)
    lists.read_only = True  # never added to in place (see FaissRetriever._add_on_disk)
    lists.prefetch_nthread = ONDISK_PREFETCH_THREADS
    lists.do_mmap()


@contextlib.contextmanager
def _c_stdout_silenced() -> Iterator[None]:
    """Send the process's C-level stdout to /dev/null meanwhile: FAISS's on-disk inverted lists
    printf a line each time their file grows. Python's own output is flushed first and unaffected after."""
    sys.stdout.flush()
    libc = ctypes.CDLL(None)
    libc.fflush(None)
    saved = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    try:
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)
