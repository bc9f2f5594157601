"""Fitted heads are cached once per content key, safely under parallel jobs: racing processes fit a head
once, a damaged automatic entry is refitted with a warning, a damaged head.checkpoint is refused."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from raee.backbones import load_backbone
from raee.experiment import head_cache_key, prepare_head
from raee.heads.linear import LinearHead
from raee.heads.prototype import PrototypeHead
from tests.conftest import TINY_CONFIGS, toy_datamodule


def _fit_in_a_process(cache_dir: str, fits_log: str, go: str, out: str) -> None:
    """One job: wait for the start signal, then prepare a prototype head whose fit is slow and logged."""
    original_fit = PrototypeHead.fit

    def logged_fit(self, *args, **kwargs):
        with open(fits_log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # widen the window in which the other process asks for the same head
        return original_fit(self, *args, **kwargs)

    PrototypeHead.fit = logged_fit
    backbone = load_backbone(tiny=TINY_CONFIGS["bert"], max_length=64, seed=0)
    head = PrototypeHead()
    while not Path(go).exists():
        time.sleep(0.01)
    prepare_head(backbone, head, toy_datamodule(9), cache_dir=cache_dir, progress=False)
    save_file({"prototypes": head.prototypes.contiguous()}, out)


def test_two_processes_racing_for_the_same_head_fit_it_once(tmp_path):
    fits_log, go = tmp_path / "fits.log", tmp_path / "go"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_fit_in_a_process,
                         args=(str(tmp_path / "cache"), str(fits_log), str(go), str(tmp_path / f"p{i}.safetensors")))
             for i in range(2)]
    for p in procs:
        p.start()
    go.touch()  # both start asking together, once their imports are done
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert len(fits_log.read_text().split()) == 1, "the second process must wait and load, not fit again"
    first, second = (load_file(str(tmp_path / f"p{i}.safetensors"))["prototypes"] for i in range(2))
    torch.testing.assert_close(first, second)
    entries = [e.name for e in (tmp_path / "cache" / "heads").iterdir() if not e.name.endswith(".lock")]
    assert len(entries) == 1 and not entries[0].startswith("."), f"one whole entry, no half-built one: {entries}"


def _entry(tmp_path: Path, backbone, head, dm) -> Path:
    return tmp_path / "heads" / head_cache_key(backbone, head, dm)


def test_a_damaged_cached_head_is_refitted_with_a_warning(tiny_bert, tmp_path):
    dm = toy_datamodule(9)
    head = PrototypeHead()
    prepare_head(tiny_bert, head, dm, cache_dir=tmp_path, progress=False)
    expected = head.prototypes.clone()  # the loaded tensors may map the file that is damaged below
    weights = _entry(tmp_path, tiny_bert, head, dm) / "prototypes.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by a full disk
    again = PrototypeHead()
    with pytest.warns(UserWarning, match="cached head .* is damaged"):
        prepare_head(tiny_bert, again, dm, cache_dir=tmp_path, progress=False)
    torch.testing.assert_close(again.prototypes, expected)
    load_file(str(weights))  # the entry is whole again


def test_training_settings_are_part_of_the_cache_key(tiny_bert):
    dm = toy_datamodule(6)
    keys = set()
    for head in (LinearHead(max_epochs=1), LinearHead(max_epochs=2), LinearHead(lr=0.5), LinearHead(dropout=0.0)):
        head.bind(tiny_bert, dm.label_names)
        keys.add(head_cache_key(tiny_bert, head, dm))
    assert len(keys) == 4


def test_a_fine_tuned_backbone_comes_back_from_the_automatic_cache(tmp_path):
    dm = toy_datamodule(12)
    trained = load_backbone(tiny=TINY_CONFIGS["bert"], seed=0)
    head = LinearHead(max_epochs=1, lr=0.01, finetune_backbone=True, backbone_lr=1e-2)
    prepare_head(trained, head, dm, cache_dir=tmp_path, progress=False)
    fresh = load_backbone(tiny=TINY_CONFIGS["bert"], seed=0)
    reloaded = LinearHead(max_epochs=1, lr=0.01, finetune_backbone=True, backbone_lr=1e-2)
    reloaded.fit = lambda *a, **k: pytest.fail("the cached head and backbone should have been loaded")
    prepare_head(fresh, reloaded, dm, cache_dir=tmp_path, progress=False)
    for name, value in trained.model.state_dict().items():
        torch.testing.assert_close(fresh.model.state_dict()[name], value)


def test_a_damaged_user_named_checkpoint_is_refused_and_kept(tiny_bert, tmp_path):
    dm = toy_datamodule(6)
    checkpoint = tmp_path / "my_head"
    prepare_head(tiny_bert, LinearHead(max_epochs=1, checkpoint=str(checkpoint)), dm, progress=False)
    (checkpoint / "head.json").write_text("{cut")
    head = LinearHead(max_epochs=1, checkpoint=str(checkpoint))
    head.fit = lambda *a, **k: pytest.fail("a checkpoint the user named must not be overwritten")
    with pytest.raises(ValueError, match="head.checkpoint=.* does not load .*delete it"):
        prepare_head(tiny_bert, head, dm, progress=False)
    assert (checkpoint / "head.json").read_text() == "{cut"


def test_an_empty_checkpoint_directory_is_trained_into(tiny_bert, tmp_path):
    dm = toy_datamodule(6)
    checkpoint = tmp_path / "empty"
    checkpoint.mkdir()
    prepare_head(tiny_bert, LinearHead(max_epochs=1, checkpoint=str(checkpoint)), dm, progress=False)
    assert json.loads((checkpoint / "head.json").read_text())["type"] == "linear"
