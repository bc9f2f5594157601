"""Evaluation on two CPU processes (Lightning DDP over gloo, ``trainer.devices=2``) equals one process row
for row: every per-example prediction, exit layer and confidence, accuracy and mean exit layer, for the
method and for the full-model and oracle passes beside it; the summary gives each rank's own timings.
Runs ``python -m raee.run -m`` in real processes (each job of a sweep launches its own ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from raee.distributed import RankBatches, combine_rank_summaries, device_count, multi_device, rank_loader

REPO = Path(__file__).resolve().parents[1]
TINY = ["backbone=tiny_bert", "data=bbcnews_small", "data.max_train_examples=60", "data.max_eval_examples=40",
        "data.batch_size=8", "logger=none", "trainer.enable_progress_bar=false"]


def run_raee(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """``python -m raee.run`` in its own process, importing this checkout's raee."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", PYTHONPATH=path)
    return subprocess.run([sys.executable, "-m", "raee.run", *args, *TINY, f"paths.cache_dir={tmp_path / 'cache'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_two_cpu_processes_equal_one_process_row_for_row(tmp_path):
    runs = {}
    for devices in (1, 2):
        sweep = tmp_path / f"devices{devices}"
        # a sweep (-m): each job launches its own ranks, in its own directory
        proc = run_raee(["-m", "exit=raee", f"trainer.devices={devices}", f"hydra.sweep.dir={sweep}"], tmp_path)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
        assert len(jobs) == 1, [j.name for j in jobs]
        runs[devices] = {json.loads((j / "summary.json").read_text())["method"]: j for j in jobs}
    for method in ("raee",):
        one, two = runs[1][method], runs[2][method]
        rows = (one / "predictions.csv").read_text()
        assert rows == (two / "predictions.csv").read_text() and rows.count("\n") == 41  # header + 40 examples
        a, b = (json.loads((d / "summary.json").read_text()) for d in (one, two))
        for field in ("num_examples", "accuracy", "macro_f1", "mean_exit_layer", "mean_layers_computed",
                      "exit_layer_counts", "full_accuracy", "oracle_accuracy", "oracle_mean_exit_layer"):
            assert a[field] == b[field], (method, field)
        assert "devices" not in a and b["devices"] == 2
        ranks = b["ranks"]
        # 5 batches of 8: rank 0 takes the first 2, rank 1 the last 3, none repeated or padded
        assert [r["num_examples"] for r in ranks] == [16, 24]
        assert all(r["wall_time_s"] > 0 and r["full_wall_time_s"] > 0 and r["wall_speedup"] > 0 for r in ranks)
        assert b["wall_time_s"] == pytest.approx(sum(r["wall_time_s"] for r in ranks))
        assert b["full_wall_time_s"] == pytest.approx(sum(r["full_wall_time_s"] for r in ranks))
        assert b["throughput"] == pytest.approx(40 / max(r["wall_time_s"] for r in ranks))
        assert "slowest rank" in b["rank_combination"]
        assert (two / "rank1.out").exists() and not (one / "rank1.out").exists()


def test_each_rank_takes_a_contiguous_block_of_whole_batches(monkeypatch):
    import raee.distributed as distributed

    loader = DataLoader(list(range(23)), batch_size=4)  # 6 batches, the last of 3
    seen = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: (rank, 3))
        seen.append([batch.tolist() for batch in rank_loader(loader, devices=3)])
    assert [len(s) for s in seen] == [2, 2, 2]
    assert sum(seen, []) == [b.tolist() for b in loader]  # the one-process batches, in order, each once
    prebuilt = DataLoader([{"x": torch.tensor([i])} for i in range(5)], batch_size=None)  # items are batches
    monkeypatch.setattr(distributed, "world", lambda: (1, 2))
    assert [b["x"].item() for b in rank_loader(prebuilt)] == [2, 3, 4]
    assert len(RankBatches(range(5))) == 3
    with pytest.raises(ValueError, match=r"2 batch\(es\), fewer than trainer.devices=4"):
        rank_loader(DataLoader(list(range(8)), batch_size=4), devices=4)


def test_device_settings_and_rank_summaries():
    assert not multi_device({"accelerator": "cpu", "devices": 1}) and multi_device({"devices": 2})
    assert multi_device({"devices": "2"}) and multi_device({"devices": [0, 1]}) and multi_device({"num_nodes": 2})
    assert not multi_device({"accelerator": "cpu", "devices": "auto"}) and multi_device({"devices": -1})
    assert device_count({"devices": 2, "num_nodes": 2}) == 4 and device_count({"devices": "auto"}) == 0
    method = {"devices": 2, "ranks": [{"rank": 0, "num_examples": 3, "wall_time_s": 1.0, "throughput": 3.0},
                                      {"rank": 1, "num_examples": 5, "wall_time_s": 2.0, "throughput": 2.5}],
              "rank_combination": "x", "slowest_rank_wall_time_s": 2.0}
    full = {"ranks": [{"rank": 0, "wall_time_s": 3.0}, {"rank": 1, "wall_time_s": 4.0}]}
    combined = combine_rank_summaries(method, full)
    assert [r["wall_speedup"] for r in combined["ranks"]] == [3.0, 2.0]
    assert combine_rank_summaries({"wall_time_s": 1.0}, full) == {}
