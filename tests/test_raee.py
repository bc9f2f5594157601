"""RAEE end to end on a tiny model: database build/save/load, compatibility checks, exits at the
layer the aggregation rule chose with no later layer computed."""

from __future__ import annotations

import json

import pytest
import torch

from raee.aggregation.base import Aggregator
from raee.aggregation.robust import RobustAggregator
from raee.backbones import load_backbone
from raee.database import ExitDatabase, build_database
from raee.exit_loop import run_early_exit
from raee.exits import BatchContext, RaeeExit
from raee.experiment import prepare_head
from raee.heads import PrototypeHead
from raee.keys import BackboneKeys
from raee.retrieval.torch_exact import TorchExactRetriever
from tests.conftest import TINY_CONFIGS, toy_datamodule


class FixedChoice(Aggregator):
    """Chooses the exit layer from the neighbour's database id: makes the expected layer known."""

    def __init__(self, layer_of_id):
        self.layer_of_id = layer_of_id

    def choose(self, distances, ids, info):
        layers = torch.tensor([self.layer_of_id(int(i)) for i in ids[:, 0]])
        dist = torch.nn.functional.one_hot(layers, info.preds.shape[1]).float()
        return layers, dist


@pytest.fixture()
def setup(tiny_bert):
    dm = toy_datamodule(18)
    head = PrototypeHead()
    prepare_head(tiny_bert, head, dm, cache_dir=None, progress=False)
    return tiny_bert, head, dm


def test_database_records_every_layer_and_round_trips(setup, tmp_path):
    bb, head, dm = setup
    db = build_database(bb, head, BackboneKeys(layer=1), TorchExactRetriever(metric="ip"), dm, tmp_path / "db",
                        shard_rows=5, progress=False)
    assert db.size == 18 and db.keys.shape == (18, 32) and len(db.meta["shards"]) == 4  # 5 + 5 + 5 + 3 rows
    assert db.info.preds.shape == db.info.probs.shape == db.info.correct.shape == (18, 5)
    # stored predictions are the head's predictions at each layer, probabilities its softmax maximum
    # (float16 on disk), keys the mean-pooled layer-1 states
    enc = bb.tokenize(dm.texts)
    states = bb.all_layers(**enc)
    probs = torch.stack([torch.softmax(head(s), -1) for s in states], dim=1)
    expected = probs.argmax(-1)
    assert torch.equal(db.info.preds.long(), expected)
    assert torch.equal(db.info.correct.bool(), expected == torch.tensor(dm.labels).unsqueeze(1))
    torch.testing.assert_close(db.info.probs.float(), probs.max(-1).values, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(db.keys.tensor(), BackboneKeys(layer=1).encode(states[1], dm.texts))
    assert torch.equal(db.ids.long(), torch.arange(18)) and torch.equal(db.info.labels.long(), torch.tensor(dm.labels))
    meta = json.loads((tmp_path / "db" / "meta.json").read_text())
    for field in ("backbone", "head", "num_layers", "key_encoder", "dataset", "count", "content_hash", "version",
                  "shards", "keep_keys", "label_names"):
        assert field in meta
    loaded = ExitDatabase.load(tmp_path / "db")
    assert torch.equal(loaded.keys.tensor(), db.keys.tensor()) and torch.equal(loaded.info.correct.tensor(),
                                                                               db.info.correct.tensor())
    q = db.keys[:3].numpy()
    assert (loaded.retriever.search(q, 4)[1] == db.retriever.search(q, 4)[1]).all()


def test_database_fraction_is_seeded(setup, tmp_path):
    bb, head, dm = setup
    a = build_database(bb, head, BackboneKeys(), TorchExactRetriever(), dm, tmp_path / "a", fraction=0.5, seed=1,
                       progress=False)
    b = build_database(bb, head, BackboneKeys(), TorchExactRetriever(), dm, tmp_path / "b", fraction=0.5, seed=1,
                       progress=False)
    assert a.size == 9 and torch.equal(a.ids.tensor(), b.ids.tensor())


def test_incompatible_database_is_refused_naming_the_field(setup, tmp_path):
    bb, head, dm = setup
    build_database(bb, head, BackboneKeys(layer=0), TorchExactRetriever(), dm, tmp_path / "db", progress=False)
    strategy = RaeeExit(BackboneKeys(layer=1), TorchExactRetriever(), RobustAggregator(), database=str(tmp_path / "db"))
    with pytest.raises(ValueError, match="different key_encoder"):
        strategy.fit(bb, head, dm)
    other = load_backbone(tiny=dict(TINY_CONFIGS["bert"], num_hidden_layers=3))
    with pytest.raises(ValueError, match="different num_layers"):
        RaeeExit(BackboneKeys(layer=0), TorchExactRetriever(), RobustAggregator(),
                 database=str(tmp_path / "db")).fit(other, head, dm)
    renamed = load_backbone(tiny=TINY_CONFIGS["bert"])
    renamed.name = "another-model"
    with pytest.raises(ValueError, match="different backbone"):
        RaeeExit(BackboneKeys(layer=0), TorchExactRetriever(), RobustAggregator(),
                 database=str(tmp_path / "db")).fit(renamed, head, dm)
    other_head = PrototypeHead(scale=3.0)
    other_head.bind(bb, dm.label_names)
    with pytest.raises(ValueError, match="different head"):
        RaeeExit(BackboneKeys(layer=0), TorchExactRetriever(), RobustAggregator(),
                 database=str(tmp_path / "db")).fit(bb, other_head, dm)


def test_missing_or_truncated_database_files_are_clear_errors(setup, tmp_path):
    bb, head, dm = setup
    build_database(bb, head, BackboneKeys(), TorchExactRetriever(), dm, tmp_path / "db", progress=False)
    probs = tmp_path / "db" / "shards" / "00000" / "probs.npy"
    probs.write_bytes(probs.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated or modified"):
        ExitDatabase.load(tmp_path / "db")
    with pytest.raises(FileNotFoundError, match="build it with"):
        ExitDatabase.load(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RaeeExit(BackboneKeys(), TorchExactRetriever(), RobustAggregator(),
                 database=str(tmp_path / "nothing")).fit(bb, head, dm)


def test_raee_exits_where_the_rule_chose_and_computes_nothing_later(setup, tmp_path):
    bb, head, dm = setup
    strategy = RaeeExit(BackboneKeys(layer=0), TorchExactRetriever(), FixedChoice(lambda i: i % 5), k=1)
    strategy.fit(bb, head, dm, cache_dir=tmp_path, progress=False)
    strategy.prepare(bb, head)
    texts = dm.texts[:10]
    enc = bb.tokenize(texts)
    bb.reset_counters()
    ctx = BatchContext(num_layers=4, batch_size=10, texts=texts)
    res = run_early_exit(bb, head, strategy, enc, ctx)
    # FixedChoice maps each query's nearest database row to layer row % 5
    expected = strategy.last["ids"][:, 0] % 5
    assert len(set(expected.tolist())) > 2, "the test needs several distinct exit layers"
    assert torch.equal(res.exit_layers, expected)
    assert bb.layer_examples[1:] == [int((expected >= l).sum()) for l in range(1, 5)]
    assert ctx.timings["retrieval_search"] > 0
    states = bb.all_layers(**enc)
    want = torch.stack([head(states[int(l)])[i] for i, l in enumerate(expected)])
    torch.testing.assert_close(res.logits, want, atol=1e-5, rtol=1e-5)


def test_k_larger_than_database_is_clamped_with_a_warning(setup, tmp_path):
    bb, head, dm = setup
    strategy = RaeeExit(BackboneKeys(), TorchExactRetriever(), RobustAggregator(), k=100)
    strategy.fit(bb, head, dm, cache_dir=tmp_path, progress=False)
    with pytest.warns(UserWarning, match="larger than the exit database"):
        strategy.prepare(bb, head)
    assert strategy.k == 18


def test_second_fit_reuses_the_cached_database(setup, tmp_path):
    bb, head, dm = setup
    RaeeExit(BackboneKeys(), TorchExactRetriever(), RobustAggregator()).fit(bb, head, dm, cache_dir=tmp_path,
                                                                              progress=False)
    bb.reset_counters()
    RaeeExit(BackboneKeys(), TorchExactRetriever(), RobustAggregator()).fit(bb, head, dm, cache_dir=tmp_path,
                                                                              progress=False)
    assert sum(bb.layer_examples) == 0


def test_empty_training_split_is_refused(setup):
    from raee.database import select_fraction

    with pytest.raises(ValueError, match="training split is empty"):
        select_fraction(0, 1.0, 0)


def test_another_retriever_reuses_the_stored_keys_without_a_backbone_pass(setup, tmp_path):
    from raee.retrieval import FaissRetriever

    bb, head, dm = setup
    first = RaeeExit(BackboneKeys(), TorchExactRetriever(), RobustAggregator())
    first.fit(bb, head, dm, cache_dir=tmp_path, progress=False)
    bb.reset_counters()
    second = RaeeExit(BackboneKeys(), FaissRetriever("Flat"), RobustAggregator())
    second.fit(bb, head, dm, cache_dir=tmp_path, progress=False)
    assert sum(bb.layer_examples) == 0
    assert isinstance(second.retriever, FaissRetriever) and second.retriever.ntotal == first.db.size
    q = first.db.keys[:5].numpy()
    # same neighbours up to ties (toy texts are word rotations with near-identical keys): same scores
    import numpy as np

    np.testing.assert_allclose(second.retriever.search(q, 3)[0], first.retriever.search(q, 3)[0], atol=1e-5)
