"""experiments/generation_layer_agreement.py on a tiny decoder: one row per layer and weight set (plus the row read
with HashEE's exits), every layer L agreeing with itself, the CSV, and a missing fine-tune refused, never trained."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import pytest

from raee.errors import UserError
from tests.conftest import load_experiment

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def script():
    return load_experiment("generation_layer_agreement")


def overrides(tmp_path: Path) -> list[str]:
    return ["backbone=tiny_gpt2", "data.max_source_tokens=16", "data.max_train_examples=8", "logger=none",
            f"paths.cache_dir={tmp_path / 'cache'}"]


def test_one_row_per_layer_and_weight_set_and_the_last_layer_agrees_with_itself(script, tmp_path):
    rows = script.run(["zero_shot", "joint"], overrides(tmp_path), examples=3, batch_size=2, train=True,
                      targets=["reference", "generated"], progress=False)
    for weights, targets in itertools.product(("zero_shot", "joint"), ("reference", "generated")):
        mine = [r for r in rows if r["weights"] == weights and r["targets"] == targets]
        layers = [r for r in mine if r["exits"] == "none"]
        L = layers[0]["num_layers"]
        assert [r["layer"] for r in layers] == list(range(1, L + 1))
        assert layers[-1]["agreement"] == 1.0 and layers[-1]["positions"] > 0
        assert all(0 <= r["agreement"] <= 1 and 0 <= r["accuracy"] <= 1 and r["ce"] > 0 for r in layers)
        hashed = [r for r in mine if r["exits"] == "hash"]
        assert len(hashed) == 1 and 1 <= hashed[0]["layer"] <= L
    assert [r["finetune_key"] for r in rows if r["weights"] == "zero_shot"][0] == ""
    assert [r["finetune_key"] for r in rows if r["weights"] == "joint"][0] != ""
    out = tmp_path / "agreement.csv"
    script.write_csv(out, rows)
    with open(out, newline="") as f:
        saved = list(csv.DictReader(f))
    assert len(saved) == len(rows) == 2 * 2 * (L + 1) and list(saved[0]) == list(script.COLUMNS)
    # the cached joint fine-tune is loaded, not trained again, when training is off
    again = script.run(["joint"], overrides(tmp_path), examples=3, batch_size=2, hash_exits=False, progress=False)
    assert again == [r for r in rows if r["weights"] == "joint" and r["targets"] == "reference"
                     and r["exits"] == "none"]


def test_a_missing_fine_tune_is_refused_not_trained(script, tmp_path):
    with pytest.raises(UserError, match="not cached.*never trains"):
        script.run(["joint"], overrides(tmp_path), examples=2, progress=False)
    assert not any((tmp_path / "cache").glob("generation_finetune/*/meta.json"))
    with pytest.raises(UserError, match="--weights bogus"):
        script.run(["bogus"], overrides(tmp_path), progress=False)
    with pytest.raises(UserError, match="--targets bogus"):
        script.run(["zero_shot"], overrides(tmp_path), targets=["bogus"], progress=False)
