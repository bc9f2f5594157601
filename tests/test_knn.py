"""exit=knn: the neighbours' label vote, with RAEE's keys and database, no head and no layer run."""

from __future__ import annotations

import json

import pytest
import torch

from raee.aggregation.base import ExitInfo
from raee.database import ExitDatabase, setup_description
from raee.exit_loop import run_early_exit
from raee.exits import BatchContext, KnnExit
from raee.exits.knn import neighbour_vote
from raee.heads.base import Head
from raee.keys import BackboneKeys
from raee.retrieval.torch_exact import TorchExactRetriever
from tests.conftest import TEXTS


def test_majority_vote_ties_go_to_the_nearest_and_empty_rows_get_the_prior():
    labels = torch.tensor([0, 1, 1, 2, 2])
    ids = torch.tensor([[0, 1, 2], [3, 0, 1], [4, 3, -1], [-1, -1, -1]])
    distances = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.1, 0.4], [0.2, 0.3, 0.0], [0.0, 0.0, 0.0]])
    shares = neighbour_vote(distances, ids, labels, 3).exp()
    assert shares.argmax(1).tolist() == [1, 0, 2, 1]
    # row 0: two votes for 1 out of 3; row 1: a three-way tie, the nearest (id 0, label 0) wins
    assert shares[0].tolist() == pytest.approx([1 / 3, 2 / 3, 0], abs=1e-3)
    assert shares[1, 0] > shares[1, 1] and shares[1, 0] > shares[1, 2]
    assert shares[2].tolist() == pytest.approx([0, 0, 1], abs=1e-6)  # invalid hit ignored
    assert shares[3].tolist() == pytest.approx([0.2, 0.4, 0.4])  # database label frequencies


def test_weighted_vote_trusts_the_nearer_neighbours():
    labels = torch.tensor([0, 1, 1])
    ids = torch.tensor([[0, 1, 2]])
    distances = torch.tensor([[0.0, 0.5, 0.5]])
    assert neighbour_vote(distances, ids, labels, 2).argmax(1).item() == 1  # majority: 2 votes to 1
    weighted = neighbour_vote(distances, ids, labels, 2, vote="weighted", temperature=0.1).exp()
    expected = torch.softmax(torch.tensor([0.0, -5.0, -5.0]), 0)
    assert weighted[0].tolist() == pytest.approx([expected[0].item(), (expected[1] + expected[2]).item()], abs=1e-5)


class NeverCalledHead(Head):
    def __init__(self, label_names):
        super().__init__()
        self.label_names = label_names

    def forward(self, state):
        raise AssertionError("knn must not read the head")


def _toy_knn(backbone, texts, labels, k, vote="majority"):
    """A knn strategy over a database whose keys are ``texts``' layer-0 keys and labels ``labels``."""
    keys_encoder = BackboneKeys(layer=0)
    enc = backbone.tokenize(texts)
    keys = keys_encoder.encode(backbone.embed(**enc), texts)
    retriever = TorchExactRetriever(metric="ip")
    retriever.add(keys.numpy())
    head = NeverCalledHead(["a", "b", "c"])
    n, width = len(texts), backbone.num_layers + 1
    info = ExitInfo(preds=torch.zeros(n, width, dtype=torch.long), probs=torch.ones(n, width),
                    correct=torch.zeros(n, width, dtype=torch.bool), labels=torch.tensor(labels))
    db = ExitDatabase(keys=keys, info=info, ids=torch.arange(n),
                      meta=setup_description(backbone, head, keys_encoder) | {"count": n}, retriever=retriever)
    strategy = KnnExit(keys_encoder, TorchExactRetriever(metric="ip"), k=k, vote=vote)
    strategy.use_database(db)
    strategy.prepare(backbone, head)
    return strategy, head


def test_knn_answers_from_the_database_labels_and_runs_no_layer(tiny_bert):
    labels = [2, 0, 1, 1, 0, 2]
    strategy, head = _toy_knn(tiny_bert, TEXTS, labels, k=1)
    tiny_bert.reset_counters()
    ctx = BatchContext(num_layers=tiny_bert.num_layers, batch_size=len(TEXTS), texts=TEXTS)
    result = run_early_exit(tiny_bert, head, strategy, tiny_bert.tokenize(TEXTS), ctx)
    assert result.predictions.tolist() == labels  # each text's nearest entry is itself
    assert result.exit_layers.tolist() == [0] * len(TEXTS)
    assert tiny_bert.layer_examples == [0] * (tiny_bert.num_layers + 1)  # not one transformer layer ran
    assert result.confidences.tolist() == pytest.approx([1.0] * len(TEXTS), abs=1e-3)
    assert ctx.timings["retrieval_search"] > 0 and "retrieval_vote" in ctx.timings


def test_knn_majority_of_three_neighbours(tiny_bert):
    texts = ["the team won the match", "the team won the game", "the team won the cup", "shares fell sharply"]
    strategy, head = _toy_knn(tiny_bert, texts, [1, 1, 0, 2], k=3)
    query = ["the team won the match"]
    ctx = BatchContext(num_layers=tiny_bert.num_layers, batch_size=1, texts=query)
    result = run_early_exit(tiny_bert, head, strategy, tiny_bert.tokenize(query), ctx)
    top3 = set(strategy.last["ids"][0].tolist())
    assert top3 == {0, 1, 2}  # the three sports sentences are nearer than the finance one
    assert result.predictions.tolist() == [1]
    assert result.confidences.item() == pytest.approx(2 / 3, abs=1e-3)


def test_knn_knobs_say_no_layer_ran_and_bad_knobs_are_refused():
    strategy = KnnExit(BackboneKeys(layer=0), TorchExactRetriever(), k=5)
    knobs = strategy.knobs()
    assert knobs["backbone_layers_run"] == 0 and knobs["vote"] == {"rule": "majority"} and knobs["k"] == 5
    with pytest.raises(ValueError, match="exit.vote='mean' is unknown"):
        KnnExit(BackboneKeys(), TorchExactRetriever(), vote="mean")
    with pytest.raises(ValueError, match="exit.temperature=0"):
        KnnExit(BackboneKeys(), TorchExactRetriever(), vote="weighted", temperature=0)


def test_exit_knn_runs_end_to_end_and_shares_raee_database(tmp_path):
    from tests.test_config import TINY, compose_cfg

    from raee.run import run_job

    common = TINY + [f"paths.cache_dir={tmp_path / 'cache'}", "compare_oracle=false"]
    raee = run_job(compose_cfg(common + ["exit=raee"]), str(tmp_path / "raee"), multirun=False)
    databases = list((tmp_path / "cache" / "db").iterdir())
    knn = run_job(compose_cfg(common + ["exit=knn"]), str(tmp_path / "knn"), multirun=False)
    assert list((tmp_path / "cache" / "db").iterdir()) == databases  # the same database, not a second one
    saved = json.loads((tmp_path / "knn" / "summary.json").read_text())
    assert saved == knn and knn["method"] == "knn" and knn["knobs"]["backbone_layers_run"] == 0
    assert knn["mean_exit_layer"] == 0.0 and knn["exit_layer_counts"][0] == knn["num_examples"]
    assert knn["retrieval_time_s"] > 0 and knn["full_accuracy"] == raee["full_accuracy"]
