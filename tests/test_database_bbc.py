"""The streaming build on the real BBC News data and MiniLM gives the neighbours and RAEE predictions
of a plain in-memory computation (what the database build did before it streamed to shards)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from raee.aggregation import RobustAggregator
from raee.data.dataset import collate_batch
from raee.database import build_database
from raee.exit_loop import run_early_exit
from raee.exits import BatchContext, RaeeExit
from raee.features import encode_batch
from raee.keys import BackboneKeys
from raee.retrieval import FaissRetriever
from raee.retrieval.base import to_distances
from tests.conftest import minilm_on_bbcnews

pytestmark = [pytest.mark.slow, pytest.mark.real_model]


@torch.no_grad()
def in_memory(backbone, head, keys, split):
    """Every example of ``split`` through every layer, all held in memory: keys (N, D), per-layer
    predictions and probabilities (N, L+1), labels (N,)."""
    out = {"keys": [], "preds": [], "probs": [], "labels": []}
    for batch in DataLoader(split, batch_size=32, collate_fn=collate_batch):
        states = backbone.all_layers(**encode_batch(backbone, head, batch))
        layer_probs = torch.stack([torch.softmax(head(s), -1) for s in states], 1)
        out["keys"].append(keys.encode(states[keys.plan_layer], batch["text"]))
        out["probs"].append(layer_probs.max(-1).values)
        out["preds"].append(layer_probs.argmax(-1))
        out["labels"].append(batch["label"])
    return {name: torch.cat(parts) for name, parts in out.items()}


def test_streaming_build_gives_the_neighbours_and_predictions_of_an_in_memory_build(tmp_path):
    backbone, data, head = minilm_on_bbcnews(max_train_examples=120, max_eval_examples=30)
    keys, rule, k = BackboneKeys(layer=0), RobustAggregator(threshold=0.5, top_p=3), 12  # the default config

    # the streaming way: shards of 32 rows (4 shards), FAISS Flat, read back memory-mapped
    build_database(backbone, head, keys, FaissRetriever("Flat"), data, tmp_path / "db", shard_rows=32,
                   progress=False)
    raee = RaeeExit(keys, FaissRetriever("Flat"), rule, k=k, database=str(tmp_path / "db"))
    raee.fit(backbone, head, data, progress=False)
    raee.prepare(backbone, head)
    assert len(raee.db.meta["shards"]) == 4
    test = data.split("test")
    batch = collate_batch([test[i] for i in range(len(test))])
    result = run_early_exit(backbone, head, raee, encode_batch(backbone, head, batch),
                            BatchContext(num_layers=backbone.num_layers, batch_size=len(test), texts=batch["text"]))
    neighbours = raee.db.ids[raee.last["ids"]]  # database rows -> positions in the training split

    # the same from a straightforward in-memory computation: exact search, float32 tables
    train, queries = in_memory(backbone, head, keys, data.split("train")), in_memory(backbone, head, keys, test)
    scores, positions = (queries["keys"] @ train["keys"].T).topk(k, dim=1)
    from raee.aggregation import ExitInfo

    info = ExitInfo(preds=train["preds"], probs=train["probs"], correct=train["preds"] == train["labels"][:, None],
                    labels=train["labels"])
    layers, _ = rule.choose(to_distances(scores, "ip"), positions, info)
    predictions = queries["preds"][torch.arange(len(test)), layers]

    assert torch.equal(neighbours, positions)
    assert torch.equal(result.exit_layers, layers)
    assert torch.equal(result.predictions, predictions)
    assert len(set(layers.tolist())) > 1  # the rule really chose (not one layer for all)
