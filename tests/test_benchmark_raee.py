"""experiments/benchmark_raee.py's figures that are not timings: the floor cap and the token-weighted layers."""

from __future__ import annotations


import pytest

from raee.exits import BatchContext, FixedLayer
from raee.features import encode_batch
from raee.heads import PrototypeHead
from raee.experiment import prepare_head
from tests.conftest import load_experiment, toy_datamodule

@pytest.fixture(scope="module")
def bench():
    return load_experiment("benchmark_raee")


def test_floor_cap_is_the_ratio_of_an_exit_without_overhead(bench):
    # 16x fewer layers, and exiting at layer 0 is 70x cheaper than the full model: per example the exit costs
    # 1/16 + 1/70 of the full model, so wall = 1 / (1/16 + 1/70) = 13.02x, i.e. 0.81 of the layer speed-up
    assert bench.floor_cap(16.0, 70.0) == pytest.approx((1 / (1 / 16 + 1 / 70)) / 16)
    assert bench.floor_cap(16.0, 70.0) == pytest.approx(0.814, abs=1e-3)
    assert bench.floor_cap(2.0, float("inf")) == 1.0  # a free floor: layers are all the cost


def test_time_once_counts_layers_and_token_layers_per_example(bench, tiny_bert):
    dm = toy_datamodule(8)
    head = PrototypeHead()
    prepare_head(tiny_bert, head, dm, cache_dir=None, progress=False)
    strategy = FixedLayer(2)
    strategy.prepare(tiny_bert, head)
    texts = dm.texts[:5]
    inputs = encode_batch(tiny_bert, head, {"text": texts, "text_pair": None})
    batches = [(inputs, lambda: BatchContext(num_layers=tiny_bert.num_layers, batch_size=len(texts), texts=texts))]
    phase = bench.time_once(tiny_bert, head, strategy, batches)
    tokens = int(inputs["attention_mask"].sum())
    assert phase["exit_layers"] == 2 * len(texts)
    assert phase["layers_computed"] == 2 * len(texts)
    assert phase["token_layers"] == 2 * tokens  # every example's own tokens, not the padded length
    assert phase["total"] > 0
