"""FAISS retrievers agree with the torch reference; knobs are really applied; indexes round-trip;
bad settings and damaged files are clear errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raee.errors import UserError
from raee.retrieval import FaissRetriever, TorchExactRetriever, auto_nlist, clamp_k, resolve_factory, to_distances
from raee.retrieval.faiss_index import auto_train_size
from raee.retrieval.faiss_index import BLAS_MIN_QUERIES

faiss = pytest.importorskip("faiss")


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    # OpenMP threads spin-wait; on a busy 2-core machine that turns a 0.2 s build into minutes
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def data(n=2000, q=100, d=32, seed=0, normalise=True):
    """Clustered keys (like sentence embeddings of a few topics) and queries near some of them.
    Continuous random values: no exact ties between distances."""
    rng = np.random.default_rng(seed)
    centres = 2.0 * rng.standard_normal((20, d))
    keys = (centres[rng.integers(0, 20, n)] + rng.standard_normal((n, d))).astype(np.float32)
    queries = (keys[rng.integers(0, n, q)] + 0.3 * rng.standard_normal((q, d))).astype(np.float32)
    if normalise:
        keys /= np.linalg.norm(keys, axis=1, keepdims=True)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return keys, queries


def recall_at(ids, ref):
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, ref)])


def reference_ids(keys, queries, k=10, metric="ip"):
    ref = TorchExactRetriever(metric=metric)
    ref.add(keys)
    return ref.search(queries, k)[1]


# ---------------------------------------------------------------------------- exact search
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_flat_equals_torch_reference(metric):
    keys, queries = data(normalise=metric == "ip")
    ref = TorchExactRetriever(metric=metric)
    ref.add(keys)
    flat = FaissRetriever("Flat", metric=metric)
    flat.add(keys)
    s_ref, i_ref = ref.search(queries, 10)
    s, i = flat.search(queries, 10)
    assert np.array_equal(i, i_ref)
    np.testing.assert_allclose(s, s_ref, rtol=1e-4, atol=1e-4)
    assert i.dtype == np.int64 and s.dtype == np.float32 and s.shape == (100, 10)
    # the torch reference is itself right: brute force in float64
    k64, q64 = keys.astype(np.float64), queries.astype(np.float64)
    exact = q64 @ k64.T if metric == "ip" else -((q64[:, None] - k64[None]) ** 2).sum(-1)
    assert np.array_equal(np.argsort(-exact, axis=1, kind="stable")[:, :10], i_ref)
    assert (flat.higher_is_better, ref.higher_is_better) == (metric == "ip",) * 2


def test_adding_in_parts_equals_adding_at_once():
    keys, queries = data(n=600)
    for make in (lambda: FaissRetriever("Flat"), lambda: TorchExactRetriever()):
        whole, parts = make(), make()
        whole.add(keys)
        parts.add(keys[:250])
        parts.add(keys[250:])
        assert parts.ntotal == 600 and parts.dim == 32
        assert np.array_equal(whole.search(queries, 7)[1], parts.search(queries, 7)[1])
        with pytest.raises(ValueError, match="dimension 16"):
            parts.add(keys[:5, :16])


# ---------------------------------------------------------------------------- approximate search
@pytest.mark.parametrize("factory,kwargs", [
    ("HNSW32", {"ef_search": 128}),
    ("IVFauto,Flat", {"nprobe": 16}),
    # the paper's HNSW + PQ layout in its notation, with m = D (one 8-bit code per dimension) so
    # that PQ alone, without re-ranking, keeps recall@10 above 0.95 (measured 0.98)
    ("HNSW32_PQ32", {"ef_search": 128}),
    # the paper scripts' IVF with an HNSW coarse quantizer, nprobe and efSearch both applied
    ("IVFauto_HNSW32,PQ32", {"nprobe": 16, "ef_search": 64}),
    # coarse 8-byte PQ codes (recall ~0.7 alone) re-ranked with the exact keys (RFlat)
    ("HNSW32_PQ8,RFlat", {"ef_search": 128, "k_factor": 4}),
])
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_approximate_indexes_reach_recall(factory, kwargs, metric):
    keys, queries = data()
    approx = FaissRetriever(factory, metric=metric, **kwargs)
    if factory.startswith("HNSW32_PQ") and metric == "ip":
        # FAISS's HNSW+PQ is L2-only: it used to be built silently with L2 scores read as inner products
        with pytest.raises(ValueError, match="L2 metric only.*retriever.metric=l2"):
            approx.add(keys)
        return
    approx.add(keys)
    recall = recall_at(approx.search(queries, 10)[1], reference_ids(keys, queries, metric=metric))
    assert recall >= 0.95, f"{factory} {kwargs}: recall@10 {recall:.3f}"


def ivf_of(r):
    return faiss.try_extract_index_ivf(r.index)


def test_nprobe_and_ef_search_are_really_applied(tmp_path):
    keys, queries = data(n=3000, d=16, seed=1)
    i_ref = reference_ids(keys, queries)
    recalls = {}
    for nprobe in (1, 32):
        r = FaissRetriever("IVFauto,Flat", nprobe=nprobe)
        r.add(keys)
        assert ivf_of(r).nprobe == nprobe and ivf_of(r).nlist == auto_nlist(3000)
        recalls[nprobe] = recall_at(r.search(queries, 10)[1], i_ref)
    assert recalls[32] > recalls[1], f"more probes must find more true neighbours: {recalls}"

    hnsw = FaissRetriever("HNSW32", ef_search=77)
    hnsw.add(keys)
    assert faiss.downcast_index(hnsw.index).hnsw.efSearch == 77
    both = FaissRetriever("IVFauto_HNSW32,Flat", nprobe=5, ef_search=55)
    both.add(keys)
    assert ivf_of(both).nprobe == 5
    assert faiss.downcast_index(ivf_of(both).quantizer).hnsw.efSearch == 55
    # reloading applies them again, from the metadata
    both.save(tmp_path / "ix")
    again = FaissRetriever.load(tmp_path / "ix")
    assert ivf_of(again).nprobe == 5 and faiss.downcast_index(ivf_of(again).quantizer).hnsw.efSearch == 55
    meta = json.loads((tmp_path / "ix" / "retriever.json").read_text())
    assert {k: meta[k] for k in ("factory", "metric", "dim", "ntotal", "nprobe", "ef_search")} == {
        "factory": "IVFauto_HNSW32,Flat", "metric": "ip", "dim": 16, "ntotal": 3000, "nprobe": 5, "ef_search": 55}


def test_k_factor_reaches_the_refine_index_and_re_ranking_more_candidates_finds_more_neighbours(tmp_path):
    keys, queries = data(n=3000, d=32, seed=2)
    i_ref = reference_ids(keys, queries)
    recalls = {}
    for k_factor in (1, 8):  # coarse 4-byte codes; only the re-ranking with SQ8 keys separates neighbours
        r = FaissRetriever("IVF32,PQ4,Refine(SQ8)", nprobe=32, k_factor=k_factor)
        r.add(keys)
        assert faiss.downcast_index(r.index).k_factor == k_factor and ivf_of(r).nprobe == 32
        recalls[k_factor] = recall_at(r.search(queries, 10)[1], i_ref)
    assert recalls[8] > recalls[1] + 0.1, f"re-ranking 8x the candidates must find more true neighbours: {recalls}"
    r.save(tmp_path / "ix")  # stored in retriever.json, applied again when loaded
    assert json.loads((tmp_path / "ix" / "retriever.json").read_text())["k_factor"] == 8
    assert faiss.downcast_index(FaissRetriever.load(tmp_path / "ix").index).k_factor == 8


def test_the_large_database_config_sets_its_search_knobs_on_the_index(tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "retriever" / "faiss_ivfpq.yaml")
    assert cfg.k_factor > 1, "FAISS's default k_factor 1 re-ranks only the k candidates it returns"
    keys, _ = data(n=3000)
    r = instantiate(cfg, storage="memory", use_gpu=False)
    r.add(keys)
    for index in (r.index, FaissRetriever.load(_saved(r, tmp_path)).index):
        ivf = faiss.extract_index_ivf(index)
        assert ivf.nprobe == cfg.nprobe
        assert faiss.downcast_index(ivf.quantizer).hnsw.efSearch == cfg.ef_search
        assert faiss.downcast_index(index).k_factor == cfg.k_factor


def _saved(r, tmp_path):
    r.save(tmp_path / "ix")
    return tmp_path / "ix"


@pytest.mark.parametrize("factory,kwargs,knob", [("Flat", {"nprobe": 8}, "nprobe"), ("HNSW32", {"nprobe": 8}, "nprobe"),
                                                 ("Flat", {"ef_search": 8}, "ef_search"),
                                                 ("IVF8,Flat", {"k_factor": 4}, "k_factor")])
def test_a_knob_that_does_not_fit_the_index_is_an_error(factory, kwargs, knob):
    with pytest.raises(ValueError, match=rf"retriever\.{knob}=null"):
        FaissRetriever(factory, **kwargs).add(data(n=100)[0])


def test_bad_settings_are_refused_early():
    with pytest.raises(ValueError, match="nprobe=0"):
        FaissRetriever("IVFauto,Flat", nprobe=0)
    with pytest.raises(ValueError, match="k_factor=0"):
        FaissRetriever("IVFauto,Flat,RFlat", k_factor=0)
    with pytest.raises(ValueError, match="use_gpu"):
        FaissRetriever("Flat", use_gpu="sometimes")
    with pytest.raises(ValueError, match="name=number"):
        FaissRetriever("Flat", params="k_factor_rf")
    with pytest.raises(ValueError, match="unknown"):
        FaissRetriever("Flat", metric="cosine")
    assert FaissRetriever("Flat", use_gpu="False").use_gpu is False  # Hydra may pass strings
    with pytest.raises(ValueError, match="not a valid FAISS index_factory string"):
        FaissRetriever("NoSuchIndex").add(data(n=50)[0])


# ---------------------------------------------------------------------------- factory strings
def test_factory_resolution():
    # the paper's underscore notation -> FAISS's comma; PQ without polysemous training ("np")
    assert resolve_factory("HNSW32_PQ64", 1000, 384) == "HNSW32,PQ64np"
    assert resolve_factory("HNSW32_PQ32x4,RFlat", 1000, 32) == "HNSW32,PQ32x4np,RFlat"
    assert resolve_factory("HNSW32", 1000, 32) == "HNSW32"
    assert resolve_factory("Flat", 5, 3) == "Flat"
    # IVFauto: nlist = 8 sqrt(N), at most N // 39, at least 1; FAISS's own IVF.._HNSW notation kept
    assert resolve_factory("IVFauto,Flat", 10000, 32) == "IVF256,Flat"  # min(800, 256)
    assert resolve_factory("IVFauto,Flat", 1_000_000, 32) == "IVF8000,Flat"  # min(8000, 25641)
    assert resolve_factory("IVFauto_HNSW32,PQ64", 100_000, 384) == "IVF2530_HNSW32,PQ64np"
    assert [auto_nlist(n) for n in (1, 38, 39, 100, 2000)] == [1, 1, 1, 2, 51]
    # explicit np / fast-scan forms and OPQ's prefix are left as they are
    assert resolve_factory("IVF16,PQ8x4fs", 1000, 32) == "IVF16,PQ8x4fs"
    assert resolve_factory("OPQ16_64,IVF16,PQ16np", 1000, 32) == "OPQ16_64,IVF16,PQ16np"


def test_factory_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"multiple of 64; use e\.g\. PQ50 \(valid m for dimension 100"):
        resolve_factory("HNSW32_PQ64", 1000, 100)
    with pytest.raises(ValueError, match=r"multiple of 64; use e\.g\. PQ48"):
        resolve_factory("HNSW32_PQ64", 1000, 96)
    with pytest.raises(ValueError, match="multiple of 48"):  # the PQ works on OPQ's 64-d output
        resolve_factory("OPQ16_64,IVF16,PQ48", 1000, 96)
    with pytest.raises(ValueError, match=r"at least 256 keys.*PQ8x7"):
        resolve_factory("HNSW32_PQ8", 200, 32)
    with pytest.raises(ValueError, match=r"IVF500 needs at least 500 keys.*IVFauto"):
        resolve_factory("IVF500,Flat", 300, 32)


# ---------------------------------------------------------------------------- persistence
@pytest.mark.parametrize("make", [
    lambda: FaissRetriever("Flat", metric="l2"),
    lambda: FaissRetriever("HNSW32", ef_search=64),
    lambda: FaissRetriever("IVFauto,PQ8", nprobe=4),
    lambda: TorchExactRetriever(),
    lambda: TorchExactRetriever(metric="l2"),
], ids=["flat-l2", "hnsw", "ivfpq", "torch-ip", "torch-l2"])
def test_save_load_round_trip(tmp_path, make):
    keys, queries = data(n=500)
    r = make()
    r.add(keys)
    r.save(tmp_path / "index")
    loaded = type(r).load(tmp_path / "index")
    s, i = r.search(queries, 5)
    s2, i2 = loaded.search(queries, 5)
    assert np.array_equal(i2, i) and np.array_equal(s2, s)
    assert loaded.describe() == r.describe() and (loaded.ntotal, loaded.dim) == (500, 32)
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == sorted(
        ["retriever.json", "keys.safetensors" if isinstance(r, TorchExactRetriever) else "index.faiss"])
    r.save(tmp_path / "index")  # overwriting in place works (atomic replace)
    assert np.array_equal(type(r).load(tmp_path / "index").search(queries, 5)[1], i)


@pytest.mark.parametrize("cls,file,make", [
    (FaissRetriever, "index.faiss", lambda: FaissRetriever("HNSW32")),
    (TorchExactRetriever, "keys.safetensors", lambda: TorchExactRetriever()),
])
def test_damaged_or_missing_files_are_clear_errors(tmp_path, cls, file, make):
    r = make()
    r.add(data(n=200)[0])
    r.save(tmp_path / "ix")
    path = tmp_path / "ix" / file
    full = path.read_bytes()
    for cut in (7, len(full) // 2, len(full) - 1):
        path.write_bytes(full[:cut])
        with pytest.raises(ValueError, match=rf"{file} is truncated or corrupt.*python -m raee\.build_db"):
            cls.load(tmp_path / "ix")
    path.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{file} is missing: rebuild the database with `python -m raee"):
        cls.load(tmp_path / "ix")
    path.write_bytes(full)
    meta = tmp_path / "ix" / "retriever.json"
    meta.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        cls.load(tmp_path / "ix")
    meta.unlink()
    with pytest.raises(FileNotFoundError, match="retriever.json is missing"):
        cls.load(tmp_path / "ix")
    with pytest.raises(ValueError, match="empty"):
        make().save(tmp_path / "other")


def test_index_that_disagrees_with_its_metadata_is_refused(tmp_path):
    keys, _ = data(n=100)
    r = FaissRetriever("Flat")
    r.add(keys)
    r.save(tmp_path / "ix")
    meta_path = tmp_path / "ix" / "retriever.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(meta | {"ntotal": 99}))
    with pytest.raises(ValueError, match="ntotal=100, its metadata .* says 99"):
        FaissRetriever.load(tmp_path / "ix")
    meta_path.write_text(json.dumps(meta | {"metric": "l2"}))
    with pytest.raises(ValueError, match="another metric"):
        FaissRetriever.load(tmp_path / "ix")


# ---------------------------------------------------------------------------- k, shapes, helpers
@pytest.mark.parametrize("make", [lambda: FaissRetriever("Flat"), lambda: TorchExactRetriever()])
def test_k_larger_than_database_is_clamped_with_a_warning(make):
    keys, queries = data(n=7)
    r = make()
    r.add(keys)
    with pytest.warns(UserWarning, match=r"k=20 is larger than the database \(7 keys\); using k=7"):
        scores, ids = r.search(queries, 20)
    assert ids.shape == scores.shape == (len(queries), 7)
    assert all(sorted(row) == list(range(7)) for row in ids.tolist())
    with pytest.raises(ValueError, match="at least 1"):
        r.search(queries, 0)
    assert clamp_k(3, 7) == 3


def test_empty_retriever_and_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="empty"):
        TorchExactRetriever().search(np.zeros((1, 4), np.float32), 1)
    r = TorchExactRetriever()
    with pytest.raises(ValueError, match="non-empty"):
        r.add(np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        r.add(np.full((2, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="unknown"):
        TorchExactRetriever(metric="cosine")
    for ret in (FaissRetriever("Flat"), TorchExactRetriever()):
        ret.add(np.eye(4, dtype=np.float32))
        with pytest.raises(ValueError, match="queries have dimension 3 but the index holds 4"):
            ret.search(np.zeros((2, 3), np.float32), 1)
        assert ret.search(np.zeros((0, 4), np.float32), 2)[1].shape == (0, 2)


def test_torch_reference_chunks_queries_without_changing_results(monkeypatch):
    import raee.retrieval.torch_exact as te

    keys, queries = data(n=300)
    r = TorchExactRetriever(metric="l2")
    r.add(keys)
    whole = r.search(queries, 5)
    monkeypatch.setattr(te, "CHUNK_ELEMENTS", 300 * 7)  # 7 queries per chunk
    parts = r.search(queries, 5)
    assert np.array_equal(whole[1], parts[1])
    np.testing.assert_allclose(whole[0], parts[0], rtol=1e-5, atol=1e-6)  # BLAS rounding depends on batch size


def test_to_distances():
    scores = torch.tensor([[0.9, 0.5, -0.2, 1.0000001, -np.inf]])
    d = to_distances(scores, "ip")
    torch.testing.assert_close(d[0, :4], torch.tensor([0.1, 0.5, 1.2, 0.0]))
    assert d[0, 4] == np.inf  # a missing hit stays non-finite (the aggregators drop it)
    l2 = to_distances(np.array([[0.0, 2.5, -1e-7, np.nan]], np.float32), "l2")
    assert l2[0, :3].tolist() == [0.0, 2.5, 0.0] and torch.isnan(l2[0, 3])
    with pytest.raises(ValueError, match="unknown"):
        to_distances(scores, "cos")


# ---------------------------------------------------------------------------- FAISS setup
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_flat_search_switches_to_blas_at_four_queries_with_the_same_neighbours(metric):
    keys, queries = data(n=500, q=9, d=48)
    r = FaissRetriever("Flat", metric=metric)
    r.add(keys)
    singles = [r.search(q[None], 7) for q in queries]  # FAISS's SIMD loop
    # FAISS compares queries x dimension with its threshold: 1 query stays below it, 4 reach it
    assert faiss.cvar.distance_compute_blas_threshold == BLAS_MIN_QUERIES * 48
    assert 48 < faiss.cvar.distance_compute_blas_threshold <= 4 * 48
    batch = r.search(queries, 7)  # BLAS
    assert np.array_equal(batch[1], np.concatenate([ids for _, ids in singles]))
    np.testing.assert_allclose(batch[0], np.concatenate([s for s, _ in singles]), rtol=1e-5, atol=1e-5)


def test_missing_faiss_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match=r"pip install -e '\.\[cpu\]'"):
        FaissRetriever("Flat").add(data(n=10)[0])
    TorchExactRetriever().add(data(n=10)[0])  # the torch retriever needs no FAISS


def test_gpu_requested_without_gpu_is_a_clear_error():
    if faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is present")
    with pytest.raises(UserError, match="no GPU.*use_gpu=auto"):
        FaissRetriever("Flat", use_gpu=True).add(data(n=50)[0])
    r = FaissRetriever("Flat", use_gpu="auto")  # auto without a GPU: the CPU index
    r.add(data(n=50)[0])
    assert not r.on_gpu


def test_torch_device_auto_and_missing_gpu(tmp_path):
    r = TorchExactRetriever(device="auto")
    assert r.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no GPU"):
            TorchExactRetriever(device="cuda")
        # a database saved on a GPU machine loads on the CPU
        r.add(data(n=20)[0])
        r.save(tmp_path / "ix")
        meta = json.loads((tmp_path / "ix" / "retriever.json").read_text())
        (tmp_path / "ix" / "retriever.json").write_text(json.dumps(meta | {"device": "cuda"}))
        assert TorchExactRetriever.load(tmp_path / "ix").device.type == "cpu"


def test_retriever_configs_instantiate():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf" / "retriever"
    expected = {"torch_exact": (TorchExactRetriever, None), "faiss_flat": (FaissRetriever, "Flat"),
                "faiss_hnsw": (FaissRetriever, "HNSW32"), "faiss_ivf": (FaissRetriever, "IVFauto,Flat"),
                "faiss_paper": (FaissRetriever, "HNSW32_PQ64"),
                "faiss_ivfpq": (FaissRetriever, "IVFauto_HNSW32,PQ32,Refine(SQ8)"),
                "faiss_gpu": (FaissRetriever, "IVFauto,PQ32")}
    assert sorted(expected) == sorted(p.stem for p in conf.glob("*.yaml"))
    for name, (cls, factory) in expected.items():
        r = instantiate(OmegaConf.load(conf / f"{name}.yaml"))
        assert type(r) is cls
        if factory:
            assert r.factory == factory
    assert instantiate(OmegaConf.load(conf / "faiss_ivf.yaml")).nprobe == 16
    assert instantiate(OmegaConf.load(conf / "faiss_hnsw.yaml")).ef_search == 128
    assert instantiate(OmegaConf.load(conf / "faiss_ivfpq.yaml")).storage == "ondisk"


def test_scale_configs_build_on_the_cpu(tmp_path):
    """faiss_ivfpq (auto) runs on the CPU here; faiss_gpu (use_gpu=true) says clearly that it needs a GPU."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    if faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is present")
    conf = Path(__file__).resolve().parents[1] / "conf" / "retriever"
    keys, queries = data(n=20_000)
    r = instantiate(OmegaConf.load(conf / "faiss_ivfpq.yaml"))
    r.train(keys, 20_000)  # (a database trains on a sample; here on all of them)
    for start in range(0, 20_000, 5000):
        r.add(keys[start:start + 5000])
    assert not r.on_gpu and r.resolved == "IVF512_HNSW32,PQ32np,Refine(SQ8)"
    assert recall_at(r.search(queries, 10)[1], reference_ids(keys, queries)) >= 0.9
    with pytest.raises(UserError, match="use_gpu=true but FAISS sees no GPU"):
        instantiate(OmegaConf.load(conf / "faiss_gpu.yaml")).add(keys)


# ---------------------------------------------------------------------------- storage, streaming, GPU choice
@pytest.mark.parametrize("factory,kwargs", [
    ("Flat", {}), ("HNSW32", {"ef_search": 64}), ("IVF32,Flat", {"nprobe": 8}), ("IVF32,PQ8", {"nprobe": 8}),
    ("IVF32,PQ8,Refine(SQ8)", {"nprobe": 8, "k_factor": 4}), ("IVF32_HNSW32,PQ8", {"nprobe": 8}),
])
@pytest.mark.parametrize("storage", ["memory", "mmap", "ondisk"])
def test_storage_modes_search_and_extend_like_an_index_in_memory(tmp_path, factory, kwargs, storage):
    keys, queries = data(n=3000)
    more = keys[:200] + 0.01
    reference = FaissRetriever(factory, **kwargs)
    size = reference.train_size(3000, 32)
    sample = keys[np.random.default_rng(0).choice(3000, size, replace=False)] if size else None
    if sample is not None:
        reference.train(sample, 3000)
    reference.add(keys)
    r = FaissRetriever(factory, storage=storage, **kwargs)
    if storage == "ondisk" and "IVF" not in factory:
        with pytest.raises(ValueError, match="storage=ondisk keeps FAISS inverted lists on disk.*IVF"):
            r.add(keys)
        return
    if sample is not None:
        r.train(sample, 3000)
    for start in range(0, 3000, 700):  # shard by shard
        r.add(keys[start:start + 700])
    expected = reference.search(queries, 10)[1]
    assert np.array_equal(r.search(queries, 10)[1], expected)
    r.save(tmp_path / "ix")
    files = {p.name for p in (tmp_path / "ix").iterdir()}
    assert files == {"index.faiss", "retriever.json"} | ({"index.ivfdata"} if storage == "ondisk" else set())
    loaded = FaissRetriever.load(tmp_path / "ix")
    assert loaded.storage == storage and np.array_equal(loaded.search(queries, 10)[1], expected)
    if storage == "ondisk":  # no page-in threads started per search call (they cost more than a batch-1 search)
        assert faiss.downcast_InvertedLists(ivf_of(loaded).invlists).prefetch_nthread == 0
        assert faiss.downcast_InvertedLists(ivf_of(r).invlists).prefetch_nthread == 0
    if storage == "mmap":  # mapped read-only: adding is refused (FAISS itself would abort the process)
        with pytest.raises(ValueError, match="read-only.*writable=True"):
            loaded.add(more)
    # extending a saved index (what appending to a database does) equals adding in memory
    grown = FaissRetriever.load(tmp_path / "ix", writable=True)
    grown.add(more)
    reference.add(more)
    expected = reference.search(queries, 10)[1]
    assert np.array_equal(grown.search(queries, 10)[1], expected)
    grown.save(tmp_path / "ix2")
    again = FaissRetriever.load(tmp_path / "ix2")
    assert again.ntotal == 3200 and np.array_equal(again.search(queries, 10)[1], expected)


def test_on_disk_lists_stay_quiet_and_compact(tmp_path, capfd):
    keys, queries = data(n=3000)
    r = FaissRetriever("IVF32,PQ8", storage="ondisk", nprobe=8)
    for start in range(0, 3000, 500):
        r.add(keys[start:start + 500])
    r.save(tmp_path / "ix")
    FaissRetriever.load(tmp_path / "ix").search(queries, 5)
    out = capfd.readouterr().out
    assert "resizing" not in out and "IO_FLAG" not in out  # FAISS's own printf lines are silenced
    # the saved lists hold the codes and ids and nothing else: 3000 x (8 code bytes + 8 id bytes)
    assert (tmp_path / "ix" / "index.ivfdata").stat().st_size == 3000 * (8 + 8)
    assert not list(r.workdir.glob("work-*"))  # the growing work file was removed


def test_training_sample_size():
    assert FaissRetriever("Flat").train_size(10**6, 384) == 0  # nothing to train
    assert FaissRetriever("HNSW32").train_size(10**6, 384) == 0
    # 64 keys per inverted list, at least 65536 (PQ codebooks), at most the keys and 1 GiB of them
    assert FaissRetriever("IVF4096,PQ48").train_size(10**6, 384) == 262144
    assert FaissRetriever("IVF256,Flat").train_size(10**6, 384) == 65536
    assert FaissRetriever("IVF256,Flat").train_size(20_000, 384) == 20_000
    assert auto_train_size(10**7, 4096, 65536) == (1 << 30) // (4 * 4096)
    assert FaissRetriever("IVF256,Flat", train_size=5000).train_size(10**6, 384) == 5000
    with pytest.raises(ValueError, match="train_size=0"):
        FaissRetriever("Flat", train_size=0)
    with pytest.raises(ValueError, match="storage='disk'"):
        FaissRetriever("Flat", storage="disk")
    with pytest.raises(ValueError, match="before the first add"):
        r = FaissRetriever("IVF16,Flat")
        r.add(data(n=1000)[0])
        r.train(data(n=1000)[0], 1000)


class FakeGpus:
    """Stands in for FAISS's GPU functions on a CPU-only build: records what the retriever asks for."""

    def __init__(self, count):
        self.count, self.calls = count, []

    def install(self, monkeypatch):
        monkeypatch.setattr(faiss, "get_num_gpus", lambda: self.count)
        monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
        monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", lambda: type("Options", (), {})(), raising=False)
        monkeypatch.setattr(faiss, "GpuParameterSpace", faiss.ParameterSpace, raising=False)

        def to_all(resources, index, options=None, gpus=None):
            self.calls.append(("sharded", len(resources), getattr(options, "shard", None)))
            return index  # the CPU index stands in for the GPU one

        def to_one(resource, device, index, options=None):
            self.calls.append(("single", device))
            return index

        monkeypatch.setattr(faiss, "index_cpu_to_gpu_multiple_py", to_all, raising=False)
        monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_one, raising=False)
        monkeypatch.setattr(faiss, "index_gpu_to_cpu", lambda index: index, raising=False)
        return self


def test_several_gpus_shard_the_index_and_one_gpu_holds_it_all(monkeypatch, tmp_path):
    """The GPU path's choices, checked with FAISS's GPU functions faked (no GPU here; never run on one)."""
    keys, queries = data(n=2000)
    fake = FakeGpus(2).install(monkeypatch)
    r = FaissRetriever("IVF16,Flat", nprobe=4)
    r.add(keys)
    assert fake.calls == [("sharded", 2, True)] and r.on_gpu  # split over both GPUs (IndexShards)
    fake.count, fake.calls = 1, []
    r = FaissRetriever("Flat")
    r.add(keys)
    assert fake.calls == [("single", 0)]
    fake.calls = []
    r = FaissRetriever("Flat", use_gpu=False)
    r.add(keys)
    assert fake.calls == [] and not r.on_gpu
    # on-disk lists are filled on the CPU, then copied to the GPU(s) when loaded for search
    fake.count, fake.calls = 2, []
    r = FaissRetriever("IVF16,Flat", storage="ondisk", nprobe=4)
    r.add(keys)
    r.save(tmp_path / "ix")
    assert fake.calls == []
    FaissRetriever.load(tmp_path / "ix", writable=True)
    assert fake.calls == []
    assert FaissRetriever.load(tmp_path / "ix").on_gpu and fake.calls == [("sharded", 2, True)]


def test_without_gpus_the_cpu_path_is_chosen():
    if faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is present")
    r = FaissRetriever("IVF16,Flat", storage="ondisk", use_gpu="auto")
    r.add(data(n=1000)[0])
    assert not r.on_gpu and type(faiss.extract_index_ivf(r.index)).__name__.startswith("IndexIVF")
