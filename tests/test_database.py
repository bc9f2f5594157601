"""The exit database at scale: sharded compact tables read memory-mapped, keys kept or not, builds
that are interrupted or raced by other processes, appends that equal a build of the union."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from raee import database
from raee.aggregation import (ConfidenceThreshold, CorrectLayerVote, EarliestCorrectVote, ExitInfo,
                              RobustAggregator, SimilarityWeightedVote)
from raee.cache import BUILDING
from raee.database import ExitDatabase, ShardMismatch, append_database, build_database, store
from raee.exits import RaeeExit
from raee.experiment import prepare_head
from raee.heads import PrototypeHead
from raee.keys import BackboneKeys
from raee.retrieval import FaissRetriever, TorchExactRetriever
from tests.conftest import TINY_CONFIGS, ListDataModule, toy_datamodule
from tests.test_raee import setup  # noqa: F401  (fixture: tiny BERT, fitted prototype head, 18 toy examples)


# ---------------------------------------------------------------------------- tables without a model
def write_tables(directory: Path, info: ExitInfo, shard_rows: int, keys: np.ndarray | None = None) -> dict:
    """``info`` written through the ShardWriter and opened again as memory-mapped tables."""
    n = info.size
    keys = np.zeros((n, 4), np.float32) if keys is None else keys
    writer = store.ShardWriter(directory / store.SHARDS_DIR, shard_rows)
    for start in range(0, n, 5):  # batches of 5, shards of shard_rows: the two do not line up
        rows = slice(start, start + 5)
        writer.add(keys=keys[rows], labels=info.labels[rows].numpy(), preds=info.preds[rows].numpy(),
                   probs=info.probs[rows].numpy(), correct=info.correct[rows].numpy(), ids=np.arange(n)[rows])
    records = [store.shard_record(directory, name) for name in writer.close()]
    meta = {"shards": records, "content_hash": store.content_hash(records), "num_layers": info.num_layers}
    return store.open_tables(directory, meta)


def random_info(n: int = 40, layers: int = 7, classes: int = 5, seed: int = 0) -> ExitInfo:
    g = torch.Generator().manual_seed(seed)
    preds = torch.randint(0, classes, (n, layers), generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    # multiples of 1/1024: float16 holds them and their complements exactly, so in-memory and on-disk values agree
    probs = torch.randint(0, 1025, (n, layers), generator=g).float() / 1024
    return ExitInfo(preds=preds, probs=probs, correct=preds == labels.unsqueeze(1), labels=labels)


def test_sharded_tables_read_rows_like_tensors(tmp_path):
    info = random_info()
    tables = write_tables(tmp_path, info, shard_rows=7)
    assert len(tables["correct"].parts) == 6  # 7 * 5 + 5 rows
    for name in ("preds", "probs", "correct", "labels"):
        table, tensor = tables[name], getattr(info, name)
        assert table.shape == tensor.shape and table.dtype == {"probs": torch.float32, "correct": torch.bool}.get(
            name, torch.int64)
        for index in (3, -1, slice(5, 23, 2), [39, 0, 7, 7], torch.tensor([[1, 38], [14, 6]]), np.array([20, 21]),
                      torch.arange(40) % 3 == 0):
            want = tensor[index]
            got = table[index]
            assert torch.equal(got, want.to(got.dtype)), (name, index)
        assert torch.equal(table.tensor(), tensor.to(table.dtype))
    assert torch.equal(tables["correct"][[2, 9], 3], info.correct[[2, 9], 3])
    assert torch.equal(torch.nonzero(tables["correct"][4]), torch.nonzero(info.correct[4]))
    assert torch.equal(tables["correct"].float().mean(0), info.correct.float().mean(0))  # whole-table use
    assert torch.equal(tables["preds"], info.preds) and not torch.equal(tables["preds"], info.preds + 1)
    with pytest.raises(IndexError, match="row 40 is out of range"):
        tables["probs"][torch.tensor([1, 40])]
    # compact storage: bits for correctness, float16 probabilities, the smallest integer types
    first = tmp_path / store.SHARDS_DIR / "00000"
    stored = {name: np.load(first / f"{name}.npy", allow_pickle=False) for name in store.TABLES}
    assert stored["correct"].shape == (7, 1) and stored["correct"].dtype == np.uint8  # 7 layers -> 1 byte
    assert stored["probs"].dtype == np.float16 and stored["preds"].dtype == np.uint8
    # probabilities are stored as float16 complements: values near 1, where the rules decide, stay distinct
    assert np.array_equal(stored["probs"], (1 - info.probs[:7].numpy()).astype(np.float16))
    near_one = torch.tensor([[0.99997, 0.9999, 1.0]])
    table = write_tables(tmp_path / "near_one", ExitInfo(preds=torch.zeros(1, 3, dtype=torch.long), probs=near_one,
                                                         correct=torch.ones(1, 3, dtype=torch.bool),
                                                         labels=torch.zeros(1, dtype=torch.long)), shard_rows=1)
    assert len(set(table["probs"][0].tolist())) == 3 and torch.allclose(table["probs"][0], near_one, atol=1e-6)
    assert store.compact_int(np.array([0, 70000])).dtype == np.uint32
    assert store.compact_int(np.array([-1, 5])).dtype == np.int8
    assert store.compact_int(np.array([0.5])).dtype == np.float32  # regression targets stay floats


def test_memory_mapped_tables_give_the_same_aggregation_results(tmp_path):
    info = random_info(n=60, layers=7)
    tables = write_tables(tmp_path, info, shard_rows=16)
    mapped = ExitInfo(preds=tables["preds"], probs=tables["probs"], correct=tables["correct"],
                      labels=tables["labels"])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 60, (25, 12), generator=g)
    ids[::4, -3:] = -1  # missing hits
    distances = torch.rand(25, 12, generator=g)
    rules = [RobustAggregator(), RobustAggregator(threshold=0.5, top_p=2), CorrectLayerVote(), EarliestCorrectVote(),
             SimilarityWeightedVote(), ConfidenceThreshold(RobustAggregator(), threshold=0.3)]
    for rule in rules:
        layers, dist = rule.choose(distances, ids, info)
        layers_m, dist_m = rule.choose(distances, ids, mapped)
        assert torch.equal(layers, layers_m) and torch.equal(dist, dist_m), type(rule).__name__
    assert len(set(RobustAggregator().choose(distances, ids, mapped)[0].tolist())) > 1  # not a constant rule


def test_many_shard_files_raise_the_open_file_limit_or_say_how(monkeypatch):
    import resource

    calls = []
    monkeypatch.setattr(resource, "getrlimit", lambda what: (1024, 4096))
    monkeypatch.setattr(resource, "setrlimit", lambda what, limits: calls.append(limits))
    store.ensure_open_files(500)  # fits: nothing to do
    assert calls == []
    store.ensure_open_files(2000)  # each memory map holds a file descriptor
    assert calls == [(2256, 4096)]
    with pytest.raises(OSError, match=r"5000 shard files.*ulimit -n 4096.*larger shards"):
        store.ensure_open_files(5000)


class Recording(TorchExactRetriever):
    """An exact retriever that wants a training sample and records what it is given."""

    def __init__(self):
        super().__init__()
        self.samples, self.adds = [], []

    def train_size(self, total, dim):
        return 100

    def train(self, sample, total):
        self.samples.append((sample.copy(), total))

    def add(self, keys):
        self.adds.append(len(keys))
        super().add(keys)


def test_the_index_trains_on_a_seeded_sample_and_fills_shard_by_shard(tmp_path):
    keys = np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float32)
    write_tables(tmp_path, random_info(n=1000), shard_rows=300, keys=keys)
    files = sorted((tmp_path / store.SHARDS_DIR).glob("*/keys.npy"))
    a, b, c = Recording(), Recording(), Recording()
    for retriever, seed in ((a, 1), (b, 1), (c, 2)):
        database.fill_index(retriever, files, [300, 300, 300, 100], seed=seed, progress=False)
    (sample, total), = a.samples
    assert sample.shape == (100, 8) and total == 1000 and a.adds == [300, 300, 300, 100]
    assert (sample[:, None] == keys[None]).all(-1).any(1).all()  # drawn from the stored keys
    assert np.array_equal(sample, b.samples[0][0]) and not np.array_equal(sample, c.samples[0][0])
    assert np.array_equal(a.keys.numpy(), keys)  # every key, in order
    database.fill_index(a, files[:1], [300], seed=1, extend=True, progress=False)  # extending: no new training
    assert len(a.samples) == 1 and a.ntotal == 1300


# ---------------------------------------------------------------------------- databases of a tiny model
def part(dm: ListDataModule, start: int, stop: int) -> ListDataModule:
    return ListDataModule(dm.texts[start:stop], dm.labels[start:stop], dm.label_names, batch_size=dm.batch_size)


def test_keys_can_be_left_out(setup, tmp_path):
    bb, head, dm = setup
    db = build_database(bb, head, BackboneKeys(), FaissRetriever("Flat"), dm, tmp_path / "db", keep_keys=False,
                        shard_rows=8, progress=False)
    assert db.keys is None and not list((tmp_path / "db").rglob("keys.npy"))
    assert db.retriever.ntotal == 18 and db.meta["keep_keys"] is False
    with pytest.raises(ValueError, match=r"without its raw keys.*python -m raee.build_db retriever="):
        db.with_retriever(TorchExactRetriever())
    kept = build_database(bb, head, BackboneKeys(), FaissRetriever("Flat"), dm, tmp_path / "kept", progress=False)
    q = kept.keys[:4].numpy()
    assert np.array_equal(db.retriever.search(q, 5)[1], kept.retriever.search(q, 5)[1])
    # auto keeps keys up to 2 GiB of float32
    assert database.resolve_keep_keys("auto", 1_000_000, 384) and not database.resolve_keep_keys("auto", 10**7, 384)
    with pytest.raises(ValueError, match="true, false or auto"):
        database.resolve_keep_keys("sometimes", 1, 1)


def test_an_interrupted_build_leaves_nothing_that_loads_and_resumes(setup, tmp_path, monkeypatch):
    bb, head, dm = setup
    real_flush = store.ShardWriter._flush
    written = []

    def flush_then_fail(self, count):
        real_flush(self, count)
        written.append(count)
        if len(written) == 2:
            raise KeyboardInterrupt("stopped after two shards")

    monkeypatch.setattr(store.ShardWriter, "_flush", flush_then_fail)
    with pytest.raises(KeyboardInterrupt):
        build_database(bb, head, BackboneKeys(), TorchExactRetriever(), dm, tmp_path / "direct", shard_rows=4,
                       progress=False)
    staged = tmp_path / "direct.parts" / "part-0-of-1" / "shards"
    assert sorted(p.name for p in staged.iterdir()) == ["00000", "00001"]  # the shards it finished
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        ExitDatabase.load(tmp_path / "direct")
    # through exit=raee's cache: nothing at the target, no temporary directory; its shards wait beside it
    monkeypatch.setattr(store, "default_shard_rows", lambda *_: 4)
    written.clear()
    strategy = RaeeExit(BackboneKeys(), TorchExactRetriever(), RobustAggregator())
    with pytest.raises(KeyboardInterrupt):
        strategy.fit(bb, head, dm, cache_dir=tmp_path / "cache", progress=False)
    target = strategy.default_database_dir(bb, head, dm, tmp_path / "cache")
    assert not target.exists() and not list(target.parent.glob(f".{target.name}.{BUILDING}*"))
    assert len(list(database.staging_dir(target).glob("part-0-of-1/shards/*/shard.json"))) == 2
    # the next use resumes: only the rows of the two missing shards (10 of 18) go through the model
    monkeypatch.setattr(store.ShardWriter, "_flush", real_flush)
    bb.reset_counters()
    strategy.fit(bb, head, dm, cache_dir=tmp_path / "cache", progress=False)
    assert bb.layer_examples[1] == 10 and strategy.db.size == 18
    assert not database.staging_dir(target).exists()  # merged into the database, then removed
    whole = build_database(bb, head, BackboneKeys(), TorchExactRetriever(), dm, tmp_path / "whole", shard_rows=4,
                           progress=False)
    assert strategy.db.meta["content_hash"] == whole.meta["content_hash"]  # every shard file the same


def test_append_then_search_equals_a_build_of_the_union(setup, tmp_path):
    bb, head, dm = setup
    keys = BackboneKeys()
    union = build_database(bb, head, keys, FaissRetriever("Flat"), dm, tmp_path / "union", shard_rows=5,
                           progress=False)
    first = build_database(bb, head, keys, FaissRetriever("Flat"), part(dm, 0, 12), tmp_path / "db", shard_rows=5,
                           progress=False)
    old_hash, old_records = first.meta["content_hash"], first.meta["shards"]
    bb.reset_counters()
    new = part(dm, 12, 18)
    appended = append_database(tmp_path / "db", bb, head, keys, new.train_dataloader(),
                               source={"file": "new.csv", "sha256": "abc"}, shard_rows=5, progress=False)
    assert bb.layer_examples[1] == 6  # only the new examples went through the backbone
    assert appended.size == union.size == 18 and len(appended.meta["shards"]) == 3 + 2
    assert appended.meta["content_hash"] != old_hash
    assert appended.meta["shards"][-1]["source"] == {"file": "new.csv", "sha256": "abc"}
    assert appended.meta["shards"][:3] == old_records  # the old shards' files, byte for byte
    for name in ("preds", "probs", "correct", "labels"):
        assert torch.equal(getattr(appended.info, name).tensor(), getattr(union.info, name).tensor()), name
    assert torch.equal(appended.keys.tensor(), union.keys.tensor())
    queries = union.keys[:18].numpy() + 0.01
    s_app, i_app = appended.retriever.search(queries, 6)
    s_uni, i_uni = union.retriever.search(queries, 6)
    assert np.array_equal(i_app, i_uni)
    np.testing.assert_allclose(s_app, s_uni, atol=1e-5)
    reloaded = ExitDatabase.load(tmp_path / "db", verify=True)
    assert np.array_equal(reloaded.retriever.search(queries, 6)[1], i_uni)
    with pytest.raises(ValueError, match="already appended"):
        append_database(tmp_path / "db", bb, head, keys, new.train_dataloader(),
                        source={"file": "new.csv", "sha256": "abc"}, progress=False)


def test_shards_that_disagree_with_the_metadata_are_refused(setup, tmp_path):
    import shutil

    bb, head, dm = setup
    build_database(bb, head, BackboneKeys(), TorchExactRetriever(), dm, tmp_path / "db", shard_rows=5,
                   progress=False)
    shards = tmp_path / "db" / "shards"
    shutil.copytree(shards / "00001", shards / "00004")  # a shard meta.json does not list
    with pytest.raises(ShardMismatch, match=r"not listed: \['00004'\]"):
        ExitDatabase.load(tmp_path / "db")
    with pytest.raises(ShardMismatch, match="disagree"):  # appending to it is refused too
        append_database(tmp_path / "db", bb, head, BackboneKeys(), part(dm, 0, 3).train_dataloader(),
                        source={"file": "x"}, progress=False)
    shutil.rmtree(shards / "00004")
    shutil.rmtree(shards / "00001")
    with pytest.raises(ShardMismatch, match=r"missing: \['00001'\]"):
        ExitDatabase.load(tmp_path / "db")
    shutil.copytree(shards / "00000", shards / "00001")  # same size, other content
    with pytest.raises(ShardMismatch, match="sha256"):
        ExitDatabase.load(tmp_path / "db", verify=True)
    meta_path = tmp_path / "db" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["shards"][0]["count"] = 4
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ShardMismatch, match="content hash"):
        ExitDatabase.load(tmp_path / "db")
    meta_path.write_text(json.dumps(dict(meta, format=1)))
    with pytest.raises(ValueError, match="format 1"):
        ExitDatabase.load(tmp_path / "db")


def test_a_damaged_automatic_database_is_rebuilt_and_a_named_one_refused(setup, tmp_path):
    bb, head, dm = setup
    RaeeExit(BackboneKeys(), TorchExactRetriever(), RobustAggregator()).fit(bb, head, dm, cache_dir=tmp_path,
                                                                              progress=False)
    (probs,) = (tmp_path / "db").rglob("probs.npy")
    probs.write_bytes(probs.read_bytes()[:-8])
    damaged = probs.read_bytes()
    with pytest.warns(UserWarning, match="exit database .* is damaged.*rebuilding"):
        RaeeExit(BackboneKeys(), TorchExactRetriever(), RobustAggregator()).fit(bb, head, dm, cache_dir=tmp_path,
                                                                                  progress=False)
    (probs,) = (tmp_path / "db").rglob("probs.npy")  # rebuilt (from the cached per-layer outputs: no layer runs)
    assert len(probs.read_bytes()) == len(damaged) + 8
    ExitDatabase.load(probs.parents[2])
    named = build_database(bb, head, BackboneKeys(), TorchExactRetriever(), dm, tmp_path / "mine", progress=False)
    (probs,) = (tmp_path / "mine").rglob("probs.npy")
    probs.write_bytes(probs.read_bytes()[:-8])
    bb.reset_counters()
    with pytest.raises(ShardMismatch, match="truncated or modified"):
        RaeeExit(BackboneKeys(), TorchExactRetriever(), RobustAggregator(), database=named.meta["path"]).fit(
            bb, head, dm, progress=False)
    assert sum(bb.layer_examples) == 0  # refused, not rebuilt


# ---------------------------------------------------------------------------- real parallel processes
def _tiny_setup():
    from raee.backbones import load_backbone

    bb = load_backbone(tiny=TINY_CONFIGS["bert"], max_length=64, seed=0)
    dm = toy_datamodule(18)
    head = PrototypeHead()
    prepare_head(bb, head, dm, cache_dir=None, progress=False)
    return bb, head, dm


def _fit_when_released(cache_dir: str, log: str, out: str, barrier) -> None:
    real = database.build_database

    def counted(*args, **kwargs):
        with open(log, "a") as f:  # one line per build, whichever process ran it
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # hold the lock long enough for the other process to wait on it
        return real(*args, **kwargs)

    database.build_database = counted
    bb, head, dm = _tiny_setup()
    barrier.wait(60)  # both processes reach fit() together
    strategy = RaeeExit(BackboneKeys(), FaissRetriever("Flat"), RobustAggregator())
    strategy.fit(bb, head, dm, cache_dir=cache_dir, progress=False)
    Path(out).write_text(json.dumps({"path": strategy.db.meta["path"], "hash": strategy.db.meta["content_hash"],
                                     "size": strategy.db.size}))


def test_two_processes_racing_build_one_complete_database(tmp_path):
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    log = tmp_path / "builds.log"
    procs = [ctx.Process(target=_fit_when_released, args=(str(tmp_path / "cache"), str(log),
                                                           str(tmp_path / f"out{i}.json"), barrier)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
        assert p.exitcode == 0
    assert len(log.read_text().split()) == 1  # one build for two processes
    a, b = (json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2))
    assert a == b and a["size"] == 18
    ExitDatabase.load(a["path"], verify=True)  # complete
    assert not list(Path(a["path"]).parent.glob(f".*.{BUILDING}*"))


def _killed_after_two_shards(cache_dir: str) -> None:
    store.default_shard_rows = lambda *_: 4
    real_flush = store.ShardWriter._flush
    written = []

    def flush_then_die(self, count):
        real_flush(self, count)
        written.append(count)
        if len(written) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    store.ShardWriter._flush = flush_then_die
    bb, head, dm = _tiny_setup()
    RaeeExit(BackboneKeys(), FaissRetriever("Flat"), RobustAggregator()).fit(bb, head, dm, cache_dir=cache_dir,
                                                                              progress=False)


def test_a_process_killed_mid_build_leaves_no_database_that_loads(tmp_path, setup):
    proc = mp.get_context("spawn").Process(target=_killed_after_two_shards, args=(str(tmp_path / "cache"),))
    proc.start()
    proc.join(180)
    assert proc.exitcode == -signal.SIGKILL
    (staged,) = (tmp_path / "cache" / "db").glob("*.parts")
    assert len(list(staged.glob("part-0-of-1/shards/*"))) == 2  # it died with two shards written
    for path in [staged, *(p for p in (tmp_path / "cache" / "db").iterdir() if p.suffix != ".parts")]:
        with pytest.raises((FileNotFoundError, ValueError)):
            ExitDatabase.load(path)
    bb, head, dm = setup  # the next job builds a complete database, clears the dead build and its parts
    strategy = RaeeExit(BackboneKeys(), FaissRetriever("Flat"), RobustAggregator())
    strategy.fit(bb, head, dm, cache_dir=tmp_path / "cache", progress=False)
    assert strategy.db.size == 18 and not list((tmp_path / "cache" / "db").glob(f".*.{BUILDING}*"))
    assert not staged.exists()


# ---------------------------------------------------------------------------- python -m raee.build_db db.append=...
def test_build_db_appends_a_file(tmp_path):
    import pandas as pd

    from raee.build_db import build
    from tests.test_config import TINY, compose_cfg

    db_dir = tmp_path / "db"
    overrides = TINY + [f"db.dir={db_dir}", f"paths.cache_dir={tmp_path / 'cache'}"]
    build(compose_cfg(overrides))
    new = tmp_path / "new.csv"
    pd.DataFrame({"text": ["shares rose", "the striker scored", "a new chip", "the minister spoke"],
                  "label": ["business", "sports", "tech", "politics"]}).to_csv(new, index=False)
    assert build(compose_cfg(overrides + [f"db.append={new}"])) == str(db_dir)
    db = ExitDatabase.load(db_dir)
    assert db.size == 64 and db.meta["shards"][-1]["source"]["file"] == str(new.resolve())
    assert db.info.labels[-4:].tolist() == [db.meta["label_names"].index(c) for c in
                                            ("business", "sports", "tech", "politics")]
    with pytest.raises(ValueError, match="already appended"):
        build(compose_cfg(overrides + [f"db.append={new}"]))
    with pytest.raises(FileNotFoundError, match="db.append=.*is not a file"):
        build(compose_cfg(overrides + [f"db.append={tmp_path / 'nothing.csv'}"]))
    with pytest.raises(ValueError, match="name it with db.dir"):
        build(compose_cfg(TINY + [f"db.append={new}", f"paths.cache_dir={tmp_path / 'cache'}"]))
