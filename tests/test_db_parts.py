"""Exit-database builds in parts and resumed builds: a build in parts, merged, equals a one-process build
(tables, content hash, neighbours, RAEE's exits); a build killed mid-way resumes from its complete shards;
missing, incomplete, duplicated and foreign parts are refused by name."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock

from raee import database
from raee.aggregation import RobustAggregator
from raee.database import ExitDatabase, build_database, build_part, merge_parts, plan_build, staging_dir
from raee.database.parts import PROGRESS_LOG, part_name
from raee.exit_loop import run_early_exit
from raee.exits import BatchContext, RaeeExit
from raee.features import encode_batch
from raee.heads import PrototypeHead
from raee.keys import BackboneKeys
from raee.retrieval import FaissRetriever
from tests.conftest import toy_datamodule
from tests.test_database import _tiny_setup
from tests.test_raee import setup  # noqa: F401  (fixture: tiny BERT, fitted prototype head, 18 toy examples)

TABLES = ("preds", "probs", "correct", "labels")


def build_in_parts(bb, head, keys, dm, target: Path, parts: int, order=None, **plan_options) -> ExitDatabase:
    """Every part of a ``parts``-part build (in ``order``), each as its own build_part call, then the merge."""
    plan, chosen = plan_build(bb, head, keys, dm, parts=parts, **plan_options)
    for part in order or range(parts):
        build_part(bb, head, keys, dm, staging_dir(target), plan, part, chosen, progress=False)
    identity = database.build_identity(bb, head, keys, dm, fraction=plan_options.get("fraction", 1.0),
                                       seed=plan_options.get("seed", 42), tolerance=None)
    return merge_parts(staging_dir(target), target, FaissRetriever("Flat"), identity, progress=False)


def assert_same_database(a: ExitDatabase, b: ExitDatabase) -> None:
    for name in TABLES:
        assert torch.equal(getattr(a.info, name).tensor(), getattr(b.info, name).tensor()), name
    assert torch.equal(a.ids.tensor(), b.ids.tensor()) and torch.equal(a.keys.tensor(), b.keys.tensor())
    assert a.meta["content_hash"] == b.meta["content_hash"]  # every shard file, byte for byte


def raee_exits(bb, head, db: ExitDatabase, dm) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """RAEE (the default rule, k=5) over ``dm``'s examples with ``db``: exit layers, predictions, neighbours."""
    strategy = RaeeExit(BackboneKeys(), db.retriever, RobustAggregator(threshold=0.5, top_p=3), k=5)
    strategy.use_database(db)
    strategy.prepare(bb, head)
    batch = {"text": dm.texts, "text_pair": None, "label": torch.tensor(dm.labels),
             "index": torch.arange(len(dm.texts))}
    result = run_early_exit(bb, head, strategy, encode_batch(bb, head, batch),
                            BatchContext(num_layers=bb.num_layers, batch_size=len(dm.texts), texts=dm.texts))
    return result.exit_layers, result.predictions, db.ids[strategy.last["ids"]].numpy()


@pytest.mark.parametrize("fraction,shard_rows,parts", [(1.0, 4, 3), (0.7, 3, 4)])
def test_a_build_in_parts_equals_a_one_process_build(setup, tmp_path, fraction, shard_rows, parts):
    bb, head, dm = setup  # batches of 4; shards of 3 rows cut batches in two, and parts start mid-batch
    keys = BackboneKeys()
    single = build_database(bb, head, keys, FaissRetriever("Flat"), dm, tmp_path / "single", fraction=fraction,
                            seed=3, shard_rows=shard_rows, progress=False)
    assert not staging_dir(tmp_path / "single").exists()  # a one-process build cleans up its part
    bb.reset_counters()
    merged = build_in_parts(bb, head, keys, dm, tmp_path / "merged", parts, order=reversed(range(parts)),
                            fraction=fraction, seed=3, shard_rows=shard_rows)
    assert bb.layer_examples[1] <= single.size + 2 * (parts - 1) * dm.batch_size  # no part redoes another's rows
    assert merged.size == single.size and merged.meta["build"]["parts"] == parts
    assert len(merged.meta["shards"]) == len(single.meta["shards"]) >= parts
    assert_same_database(merged, single)
    queries = toy_datamodule(12)  # other word orders than the training texts
    queries.texts = [t.upper() for t in queries.texts]
    for a, b in zip(raee_exits(bb, head, merged, queries), raee_exits(bb, head, single, queries)):
        assert np.array_equal(np.asarray(a), np.asarray(b))  # same neighbours, exits and predictions
    log = (tmp_path / "merged" / "build.log").read_text()
    assert f"{part_name(0, parts)} shard 00000 done" in log and "examples/s" in log and "left" in log


def test_missing_incomplete_duplicated_and_foreign_parts_are_refused_by_name(setup, tmp_path):
    bb, head, dm = setup
    keys, target = BackboneKeys(), tmp_path / "db"
    staging = staging_dir(target)
    plan, chosen = plan_build(bb, head, keys, dm, parts=3, shard_rows=4)
    identity = database.build_identity(bb, head, keys, dm, fraction=1.0, seed=42, tolerance=None)

    def merge():
        return merge_parts(staging, target, FaissRetriever("Flat"), identity, progress=False)

    with pytest.raises(FileNotFoundError, match="no parts to merge"):
        merge()
    for part in (0, 2):
        build_part(bb, head, keys, dm, staging, plan, part, chosen, progress=False)
    with pytest.raises(ValueError, match=r"part 1 of 3 is missing.*db\.part=1 db\.parts=3"):
        merge()
    build_part(bb, head, keys, dm, staging, plan, 1, chosen, progress=False)
    (staging / "part-1-of-3" / "part.json").unlink()  # killed after its last shard
    with pytest.raises(ValueError, match=r"part 1 of 3 is incomplete \(2 of 2 shards\)"):
        merge()
    build_part(bb, head, keys, dm, staging, plan, 1, chosen, progress=False)  # resumes: nothing to compute
    shutil.copytree(staging / "part-2-of-3", staging / "part-2-of-3-copy")
    with pytest.raises(ValueError, match=r"part 2 of 3 is duplicated: .*part-2-of-3, .*part-2-of-3-copy"):
        merge()
    shutil.rmtree(staging / "part-2-of-3-copy")
    # a part built for another head is foreign, whichever job made it
    other_head = PrototypeHead(scale=3.0)
    other_head.bind(bb, dm.label_names)
    other_head.prototypes, other_head.centers = head.prototypes, head.centers
    foreign_plan, _ = plan_build(bb, other_head, keys, dm, parts=3, shard_rows=4)
    mixed = tmp_path / "mixed"
    shutil.copytree(staging / "part-0-of-3", mixed / "part-0-of-3")
    with pytest.raises(ValueError, match=r"holds part-0-of-3 of another build, built for another setup \(setup\.head"):
        build_part(bb, other_head, keys, dm, mixed, foreign_plan, 1, chosen, progress=False)
    foreign = tmp_path / "foreign"
    build_part(bb, other_head, keys, dm, foreign, foreign_plan, 1, chosen, progress=False)
    shutil.rmtree(staging / "part-1-of-3")
    shutil.copytree(foreign / "part-1-of-3", staging / "part-1-of-3")
    with pytest.raises(ValueError, match=r"part-1-of-3 in .* is a foreign part: .*setup\.head"):
        merge()
    # parts of a build with another part count cannot be merged with these
    shutil.rmtree(staging / "part-1-of-3")
    build_part(bb, head, keys, dm, staging, plan, 1, chosen, progress=False)
    two, _ = plan_build(bb, head, keys, dm, parts=2, shard_rows=4)
    with pytest.raises(ValueError, match=r"holds part-0-of-3 of another build, planned as 3 part\(s\)"):
        build_part(bb, head, keys, dm, staging, two, 0, chosen, progress=False)
    # the same part twice at the same time: the second is refused while the first holds its lock
    with FileLock(str(staging / ".part-1-of-3.lock")):
        with pytest.raises(ValueError, match="part-1-of-3 .* is being built by another process"):
            build_part(bb, head, keys, dm, staging, plan, 1, chosen, progress=False)
    db = merge()
    assert db.size == 18


def test_a_damaged_shard_is_recomputed_and_rebuild_starts_afresh(setup, tmp_path):
    bb, head, dm = setup
    keys, staging = BackboneKeys(), tmp_path / "staging"
    plan, chosen = plan_build(bb, head, keys, dm, parts=1, shard_rows=4)
    build_part(bb, head, keys, dm, staging, plan, 0, chosen, progress=False)
    first = staging / "part-0-of-1" / "shards" / "00002" / "probs.npy"
    data = bytearray(first.read_bytes())
    data[-1] ^= 0xFF  # same size, other content: only the sha256 tells
    first.write_bytes(bytes(data))
    (staging / "part-0-of-1" / "part.json").unlink()
    bb.reset_counters()
    result = build_part(bb, head, keys, dm, staging, plan, 0, chosen, progress=False)
    assert (result.reused, result.computed) == (2, 3) and bb.layer_examples[1] == 10  # shards 2..4 again
    assert "resuming: 2 of 5 shards complete (sha256 checked)" in (staging / PROGRESS_LOG).read_text()
    bb.reset_counters()
    result = build_part(bb, head, keys, dm, staging, plan, 0, chosen, rebuild=True, progress=False)
    assert (result.reused, result.computed) == (0, 5) and bb.layer_examples[1] == 18


def test_parts_and_layouts_are_checked_before_any_work(setup):
    bb, head, dm = setup
    with pytest.raises(ValueError, match=r"db.parts=10 is more than the 5 shard\(s\).*db.shard_rows=1"):
        plan_build(bb, head, BackboneKeys(), dm, parts=10, shard_rows=4)
    plan, chosen = plan_build(bb, head, BackboneKeys(), dm, parts=2, shard_rows=4)
    assert [list(plan.part_shards(p)) for p in range(2)] == [[0, 1], [2, 3, 4]]
    with pytest.raises(ValueError, match=r"db.part=2 must be one of 0..1"):
        build_part(bb, head, BackboneKeys(), dm, "unused", plan, 2, chosen)
    # automatic shards: about 32 per build, at least 64 rows, at most the memory bound
    assert database.parts.auto_shard_rows(18, 32, 4) == 64 and database.parts.auto_shard_rows(10**5, 384, 6) == 3125
    assert database.parts.auto_shard_rows(10**8, 4096, 32) == database.store.default_shard_rows(4096, 32)


# ---------------------------------------------------------------------------- a build killed by another process
def _slow_build(target: str) -> None:
    """A one-process build whose batches take 0.4 s each (tiny model, 18 rows in 5 batches of 4)."""
    from raee.database import parts

    real = parts.exit_rows

    def slow(*args, **kwargs):
        time.sleep(0.4)
        return real(*args, **kwargs)

    parts.exit_rows = slow
    bb, head, dm = _tiny_setup()
    build_database(bb, head, BackboneKeys(), FaissRetriever("Flat"), dm, target, shard_rows=4, progress=False)


def test_a_build_killed_mid_way_resumes_and_equals_an_uninterrupted_build(tmp_path):
    target = tmp_path / "db"
    proc = mp.get_context("spawn").Process(target=_slow_build, args=(str(target),))
    proc.start()
    log = staging_dir(target) / PROGRESS_LOG
    deadline = time.time() + 180
    while time.time() < deadline and not (log.exists() and "shard 00001 done" in log.read_text()):
        time.sleep(0.05)
    proc.kill()  # SIGKILL during the third shard's batches: no cleanup runs
    proc.join(60)
    assert "shard 00001 done" in log.read_text() and not (target / "meta.json").exists()
    done = len(list(staging_dir(target).glob("part-0-of-1/shards/*/shard.json")))
    assert 2 <= done < 5
    bb, head, dm = _tiny_setup()
    bb.reset_counters()  # (fitting the head ran the examples once)
    resumed = build_database(bb, head, BackboneKeys(), FaissRetriever("Flat"), dm, target, shard_rows=4,
                             progress=False)
    assert bb.layer_examples[1] == 18 - 4 * done  # only the missing shards' rows went through the model
    assert f"resuming: {done} of 5 shards complete" in (target / "build.log").read_text()
    bb.reset_counters()
    whole = build_database(bb, head, BackboneKeys(), FaissRetriever("Flat"), dm, tmp_path / "whole", shard_rows=4,
                           progress=False)
    assert_same_database(resumed, whole)


# ---------------------------------------------------------------------------- python -m raee.build_db
def test_build_db_parts_then_merge_and_first_use(tmp_path, capsys):
    from raee.build_db import build
    from tests.test_config import TINY, compose_cfg

    cache = f"paths.cache_dir={tmp_path / 'cache'}"
    single = build(compose_cfg(TINY + [f"db.dir={tmp_path / 'single'}", "db.shard_rows=16", cache]))
    parted = TINY + [f"db.dir={tmp_path / 'db'}", "db.parts=2", cache]
    for part in (1, 0):
        build(compose_cfg(parted + [f"db.part={part}", "db.shard_rows=16"]))
    out = capsys.readouterr().out
    assert "parts done: part-0-of-2, part-1-of-2; not yet: none. Merge them with" in out
    assert "db.merge=true" in out
    cfg = compose_cfg(parted)  # a named database whose parts are all there: exit=raee merges them on first use
    from hydra.utils import instantiate

    from raee.experiment import prepare_head

    bb, head, dm = instantiate(cfg.backbone), instantiate(cfg.head), instantiate(cfg.data)
    dm.setup("fit")
    prepare_head(bb, head, dm, cache_dir=cfg.paths.cache_dir, progress=False)
    bb.reset_counters()
    instantiate(cfg.exit).fit(bb, head, dm, cache_dir=cfg.paths.cache_dir, progress=False)
    assert sum(bb.layer_examples) == 0 and (tmp_path / "db" / "meta.json").exists()
    for part in (1, 0):  # again, and this time merged by the command
        build(compose_cfg(parted + [f"db.part={part}", "db.shard_rows=16"]))
    merged = build(compose_cfg(parted + ["db.merge=true"]))
    assert json.loads((Path(merged) / "meta.json").read_text())["content_hash"] == \
        json.loads((Path(single) / "meta.json").read_text())["content_hash"]
    assert not (tmp_path / "db.parts").exists()
    assert build(compose_cfg(parted + ["db.merge=true"])) == merged  # merged already: nothing to do
    assert "nothing to merge" in capsys.readouterr().out
    # no db.dir: the parts go beside the automatic database, and exit=raee merges them on first use
    auto = TINY + ["db.parts=3", cache, "db.shard_rows=8"]
    for part in range(3):
        build(compose_cfg(auto + [f"db.part={part}"]))
    (staged,) = (tmp_path / "cache" / "db").glob("*.parts")
    cfg = compose_cfg(TINY + [cache])
    bb, head, dm = instantiate(cfg.backbone), instantiate(cfg.head), instantiate(cfg.data)
    dm.setup("fit")
    prepare_head(bb, head, dm, cache_dir=cfg.paths.cache_dir, progress=False)
    strategy = instantiate(cfg.exit)
    bb.reset_counters()
    strategy.fit(bb, head, dm, cache_dir=cfg.paths.cache_dir, progress=False)
    assert sum(bb.layer_examples) == 0 and strategy.db.size == 60 and strategy.db.meta["build"]["parts"] == 3
    assert not staged.exists()


def test_build_db_part_options_are_checked(tmp_path):
    from raee.build_db import build
    from tests.test_config import TINY, compose_cfg

    base = TINY + [f"db.dir={tmp_path / 'db'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    with pytest.raises(ValueError, match=r"db.parts=4 splits the build .* -m db.part=0,1,2,3 db.parts=4"):
        build(compose_cfg(base + ["db.parts=4"]))
    with pytest.raises(ValueError, match=r"db.part=4 must be one of 0..3"):
        build(compose_cfg(base + ["db.parts=4", "db.part=4"]))
    with pytest.raises(ValueError, match="run them as two commands"):
        build(compose_cfg(base + ["db.parts=4", "db.part=0", "db.merge=true"]))
    with pytest.raises(FileNotFoundError, match="no parts to merge"):
        build(compose_cfg(base + ["db.merge=true"]))


# ---------------------------------------------------------------------------- real model
@pytest.mark.slow
@pytest.mark.real_model
def test_bbc_news_with_minilm_in_four_parts_equals_one_process(tmp_path):
    from tests.conftest import minilm_on_bbcnews

    backbone, data, head = minilm_on_bbcnews(max_train_examples=200, max_eval_examples=40)
    keys = BackboneKeys(layer=0)  # the default config's keys and rule
    single = build_database(backbone, head, keys, FaissRetriever("Flat"), data, tmp_path / "single", shard_rows=25,
                            progress=False)
    merged = build_in_parts(backbone, head, keys, data, tmp_path / "merged", 4, shard_rows=25)
    assert merged.size == 200 and len(merged.meta["shards"]) == 8
    assert_same_database(merged, single)
    test = data.split("test")
    queries = type("Queries", (), {"texts": list(test.texts), "labels": test.labels.tolist()})()
    exits, preds, neighbours = raee_exits(backbone, head, merged, queries)
    for a, b in zip((exits, preds, neighbours), raee_exits(backbone, head, single, queries)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert len(set(exits.tolist())) > 1  # the rule really chose
