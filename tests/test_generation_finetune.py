"""Generation fine-tuning: the losses read the target tokens only and equal Hugging Face's own; the joint
loss is CALM's weighted average; token exits copy a token's state upward; each loss trains; fine-tunes are
cached by content (reused, rebuilt when damaged, refused when a named checkpoint is damaged)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.nn import functional as F

from raee.backbones import load_backbone
from raee.errors import UserError
from raee.generation import trainer as ft
from raee.generation.finetune import (WEIGHTS_ORIGIN, GenerationFinetune, cached_finetune, finetune_key, finetune_lm,
                                      training_pairs)
from raee.generation.trainer import (collate_pairs, finetune_generation, reads_of,
                                     reference_forward_with_exits as forward_with_exits)
from raee.generation.lm_losses import (calm_weights, joint_loss, last_layer_loss, layer_loss,
                                       prediction_positions)
from tests.conftest import TINY_CONFIGS

pytestmark = pytest.mark.usefixtures("single_thread")

PAIRS = [([5, 17, 23, 42, 8], [101, 102, 2]), ([7, 9], [300, 2]), ([11, 12, 13], [400, 401, 402, 2]),
         ([21, 22, 23, 24], [500, 2])]


@pytest.fixture(scope="module")
def tiny_lms() -> dict:
    return {name: load_backbone(tiny=TINY_CONFIGS[name], max_length=64) for name in ("llama", "gpt2")}


@pytest.fixture()
def llama(tiny_lms):
    """A fresh copy of the tiny Llama (fine-tunes change its weights)."""
    return copy.deepcopy(tiny_lms["llama"])


def hf_target_loss(bb, batch: dict) -> torch.Tensor:
    """Hugging Face's causal-LM loss with the prompt and the padding masked out (labels = -100)."""
    labels = torch.where(batch["target_mask"], batch["input_ids"], torch.full_like(batch["input_ids"], -100))
    hidden = bb.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    logits = bb.lm_head(hidden)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


# ---------------------------------------------------------------------------- batches and losses
def test_collate_marks_the_target_tokens_and_pads_on_the_right():
    batch = collate_pairs(PAIRS[:2], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 17, 23, 42, 8, 101, 102, 2], [7, 9, 300, 2, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 8, [1, 1, 1, 1, 0, 0, 0, 0]]
    assert batch["target_mask"].int().tolist() == [[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0, 0]]
    positions, labels = prediction_positions(batch["target_mask"], batch["input_ids"])
    assert positions.tolist() == [[0, 4], [0, 5], [0, 6], [1, 1], [1, 2]]  # the state before each target token
    assert labels.tolist() == [101, 102, 2, 300, 2]
    with pytest.raises(UserError, match="empty target"):
        collate_pairs([([1, 2], [])], pad_id=0)
    with pytest.raises(UserError, match="empty prompt"):
        collate_pairs([([], [3])], pad_id=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_last_layer_loss_equals_hugging_face_loss_on_the_targets(tiny_lms, family):
    bb = tiny_lms[family]
    batch = collate_pairs(PAIRS, pad_id=bb.tokenizer.pad_token_id)
    with torch.no_grad():
        states = bb.all_layers(batch["input_ids"], batch["attention_mask"])
        ours = last_layer_loss(bb, states[-1].hidden, batch["target_mask"], batch["input_ids"])
        torch.testing.assert_close(ours, hf_target_loss(bb, batch), atol=1e-5, rtol=1e-5)


def test_joint_loss_is_calms_weighted_average_of_every_layer(tiny_lms):
    bb = tiny_lms["llama"]
    L = bb.num_layers
    w = calm_weights(L)
    assert torch.allclose(w.sum(), torch.tensor(1.0)) and bool((w[1:] > w[:-1]).all())
    assert torch.allclose(w, torch.arange(1, L + 1) / (L * (L + 1) / 2))
    batch = collate_pairs(PAIRS, pad_id=0)
    with torch.no_grad():
        hiddens = [s.hidden for s in bb.all_layers(batch["input_ids"], batch["attention_mask"])[1:]]
        loss, per_layer = joint_loss(bb, hiddens, batch["target_mask"], batch["input_ids"])
        positions, labels = prediction_positions(batch["target_mask"], batch["input_ids"])
        expected = [layer_loss(bb, h, positions, labels) for h in hiddens]
        torch.testing.assert_close(per_layer, torch.stack(expected))
        torch.testing.assert_close(loss, (torch.stack(expected) * w).sum())
        only_last = joint_loss(bb, hiddens, batch["target_mask"], batch["input_ids"],
                               weights=torch.tensor([0.0] * (L - 1) + [1.0]))[0]
        torch.testing.assert_close(only_last, last_layer_loss(bb, hiddens[-1], batch["target_mask"],
                                                              batch["input_ids"]))


# ---------------------------------------------------------------------------- token exits (teacher forcing)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_no_token_exit_equals_the_plain_forward(tiny_lms, family):
    bb = tiny_lms[family]
    batch = collate_pairs(PAIRS, pad_id=0)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        plain = bb.all_layers(ids, mask)[-1].hidden
        with_exits = forward_with_exits(bb, ids, mask, torch.full_like(ids, bb.num_layers))
    torch.testing.assert_close(with_exits, plain)


def test_an_exited_token_keeps_its_exit_state_and_later_tokens_see_the_copy(tiny_lms):
    bb = tiny_lms["llama"]
    ids = torch.tensor([[5, 17, 23, 42, 8, 101]])
    mask = torch.ones_like(ids)
    exits = torch.full_like(ids, bb.num_layers)
    exits[0, 2] = 1  # token 2 leaves after layer 1
    with torch.no_grad():
        states = bb.all_layers(ids, mask)
        out = forward_with_exits(bb, ids, mask, exits)
    torch.testing.assert_close(out[0, 2], states[1].hidden[0, 2])  # frozen at its layer-1 state
    torch.testing.assert_close(out[0, :2], states[-1].hidden[0, :2])  # earlier tokens: causal, unaffected
    assert not torch.allclose(out[0, 3:], states[-1].hidden[0, 3:], atol=1e-4)  # later ones attend to the copy
    # causality holds with exits too: a prefix's forward is the prefix of the forward
    with torch.no_grad():
        prefix = forward_with_exits(bb, ids[:, :4], mask[:, :4], exits[:, :4])
    torch.testing.assert_close(prefix, out[:, :4])


def test_token_exits_see_the_read_positions(tiny_lms):
    """The exits function gets the positions whose next token is predicted (the last prompt token on), so that a
    prompt-only hash can keep them at L as decoding does."""
    bb = tiny_lms["llama"]
    L = bb.num_layers
    seen = {}

    def prompt_only(ids, mask, reads):
        seen["reads"] = reads
        return torch.where(reads, torch.full_like(ids, L), torch.ones_like(ids))

    module = ft.GenerationFinetuning(bb, "token_exits", lr=1e-3, weight_decay=0.0, warmup=0.0, token_exits=prompt_only)
    batch = collate_pairs(PAIRS[:2], pad_id=0)
    exits = module.exit_layers(batch)
    assert seen["reads"].int().tolist() == [[0, 0, 0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0, 0, 0]]
    assert torch.equal(reads_of(batch["target_mask"]), seen["reads"])
    assert exits.tolist() == [[1, 1, 1, 1, L, L, L, 1], [1, L, L, 1, 1, 1, 1, 1]]


# ---------------------------------------------------------------------------- training
@pytest.mark.parametrize("loss", ["last", "joint", "token_exits"])
def test_each_loss_trains_the_model_on_its_targets(llama, loss):
    exits = (lambda ids, mask, reads: 1 + ids % llama.num_layers) if loss == "token_exits" else None
    batch = collate_pairs(PAIRS, pad_id=0)

    def current() -> float:
        with torch.no_grad():
            if loss == "token_exits":
                hidden = forward_with_exits(llama, batch["input_ids"], batch["attention_mask"],
                                            exits(batch["input_ids"], batch["attention_mask"], None))
                return float(last_layer_loss(llama, hidden, batch["target_mask"], batch["input_ids"]))
            hiddens = [s.hidden for s in llama.all_layers(batch["input_ids"], batch["attention_mask"])[1:]]
            if loss == "last":
                return float(last_layer_loss(llama, hiddens[-1], batch["target_mask"], batch["input_ids"]))
            return float(joint_loss(llama, hiddens, batch["target_mask"], batch["input_ids"])[0])

    before = current()
    stats = finetune_generation(llama, PAIRS, loss=loss, token_exits=exits, exit_forward=forward_with_exits,
                                batch_size=2, max_epochs=8, lr=2e-2, warmup=0.0, progress=False)
    assert stats.steps == 16 and stats.examples == 8 * len(PAIRS)
    assert current() < 0.7 * before
    assert not any(p.requires_grad for p in llama.parameters()) and not llama.training
    assert (stats.layer_losses is not None) == (loss == "joint")


def test_tied_lm_head_is_trained_once_and_untied_head_too(tiny_lms):
    gpt2 = copy.deepcopy(tiny_lms["gpt2"])  # GPT-2 ties its head to the embeddings
    assert gpt2.lm_head.weight is gpt2.model.get_input_embeddings().weight
    params = ft.lm_parameters(gpt2)
    assert len(params) == len({id(p) for p in params}) == len(list(gpt2.model.parameters()))
    llama = tiny_lms["llama"]  # untied: its head's matrix is trained too
    assert len(ft.lm_parameters(llama)) == len(list(llama.model.parameters())) + 1


def test_bad_settings_are_refused(llama):
    with pytest.raises(UserError, match="unknown"):
        finetune_generation(llama, PAIRS, loss="kl")
    with pytest.raises(UserError, match="needs the token exits"):
        finetune_generation(llama, PAIRS, loss="token_exits")
    with pytest.raises(UserError, match="max_epochs"):
        finetune_generation(llama, PAIRS, max_epochs=0)
    with pytest.raises(UserError, match="warm-up"):
        finetune_generation(llama, PAIRS, warmup=1.0)
    with pytest.raises(UserError, match="unknown"):
        GenerationFinetune(loss="nope")


def test_progress_goes_to_the_log(llama, caplog):
    caplog.set_level("INFO", logger="raee.generation.finetune")
    finetune_generation(llama, PAIRS, batch_size=2, max_epochs=1, progress=False, log_every_s=0.0)
    lines = [r.getMessage() for r in caplog.records]
    assert any("step 1/2" in line and "examples/s" in line and "left" in line for line in lines), lines
    assert "(done)" in lines[-1]
    assert ft.format_seconds(3725) == "1h02m" and ft.format_seconds(245) == "4m05s"


# ---------------------------------------------------------------------------- the cache
def weights_of(bb) -> dict:
    return {k: v.clone() for k, v in bb.model.state_dict().items()}


def test_same_content_is_trained_once_then_reloaded(tiny_lms, tmp_path, monkeypatch):
    settings = GenerationFinetune(max_epochs=2, batch_size=2, lr=1e-3)
    first = copy.deepcopy(tiny_lms["llama"])
    start = weights_of(first)
    trained = cached_finetune(first, PAIRS, settings, cache_dir=tmp_path, progress=False)
    assert not trained.loaded and trained.stats.steps == 4
    assert trained.directory.parent == tmp_path / "generation_finetune"
    meta = json.loads((trained.directory / "meta.json").read_text())
    assert meta["settings"]["loss"] == "last" and meta["stats"]["steps"] == 4
    assert getattr(first, WEIGHTS_ORIGIN) == trained.key
    assert any(not torch.equal(start[k], v) for k, v in weights_of(first).items())

    def no_training(*args, **kwargs):
        raise AssertionError("a cached fine-tune was trained again")

    monkeypatch.setattr("raee.generation.finetune.finetune_generation", no_training)
    second = copy.deepcopy(tiny_lms["llama"])
    again = cached_finetune(second, PAIRS, settings, cache_dir=tmp_path, progress=False)
    assert again.loaded and again.key == trained.key and again.stats.steps == 4
    for k, v in weights_of(first).items():
        assert torch.equal(v, second.model.state_dict()[k]), k
    torch.testing.assert_close(second.lm_head.weight, first.lm_head.weight)  # untied head saved and reloaded


def test_the_key_follows_content_settings_exits_and_start(tiny_lms):
    bb = copy.deepcopy(tiny_lms["llama"])
    base = GenerationFinetune()
    key = finetune_key(bb, PAIRS, base)
    assert key == finetune_key(bb, [(list(p), list(t)) for p, t in PAIRS], base)
    assert key != finetune_key(bb, PAIRS[:3], base)
    assert key != finetune_key(bb, [PAIRS[1], PAIRS[0], *PAIRS[2:]], base)  # batch order depends on it
    assert key != finetune_key(bb, [(PAIRS[0][0], [101, 2]), *PAIRS[1:]], base)
    assert key != finetune_key(bb, PAIRS, GenerationFinetune(loss="joint"))
    assert key != finetune_key(bb, PAIRS, GenerationFinetune(max_epochs=2))
    assert key != finetune_key(bb, PAIRS, GenerationFinetune(lr=1e-4))
    hashee = GenerationFinetune(loss="token_exits")
    assert finetune_key(bb, PAIRS, hashee, {"hash": "random"}) != finetune_key(bb, PAIRS, hashee, {"hash": "frequency"})
    setattr(bb, WEIGHTS_ORIGIN, "abc")  # weights another fine-tune made: another starting point
    assert key != finetune_key(bb, PAIRS, base)


def test_a_damaged_entry_is_rebuilt_and_a_damaged_named_checkpoint_refused(tiny_lms, tmp_path):
    settings = GenerationFinetune(max_epochs=1, batch_size=4)
    first = cached_finetune(copy.deepcopy(tiny_lms["llama"]), PAIRS, settings, cache_dir=tmp_path, progress=False)
    weights = first.directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="damaged"):
        rebuilt = cached_finetune(copy.deepcopy(tiny_lms["llama"]), PAIRS, settings, cache_dir=tmp_path,
                                  progress=False)
    assert not rebuilt.loaded and rebuilt.directory == first.directory
    named = tmp_path / "mine"
    cached_finetune(copy.deepcopy(tiny_lms["llama"]), PAIRS, settings, checkpoint=named, progress=False)
    (named / "model.safetensors").write_bytes(b"not a safetensors file")
    bb = copy.deepcopy(tiny_lms["llama"])
    before = weights_of(bb)
    with pytest.raises(Exception):
        cached_finetune(bb, PAIRS, settings, checkpoint=named, progress=False)
    assert all(torch.equal(before[k], v) for k, v in weights_of(bb).items())  # the model is unchanged
    json_meta = named / "meta.json"
    meta = json.loads(json_meta.read_text())
    meta["settings"]["loss"] = "joint"
    json_meta.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="was made for the joint loss"):
        cached_finetune(bb, PAIRS, settings, checkpoint=named, progress=False)


def test_extra_tensors_travel_with_the_weights(tiny_lms, tmp_path):
    settings = GenerationFinetune(loss="token_exits", max_epochs=1, batch_size=4)
    token_map = torch.arange(40) % 3 + 1
    exits = lambda ids, mask, reads: token_map[ids % 40]  # noqa: E731
    made = cached_finetune(copy.deepcopy(tiny_lms["llama"]), PAIRS, settings, token_exits=exits,
                           exits={"hash": "toy"}, extra={"token_to_layer": token_map}, cache_dir=tmp_path,
                           progress=False, exit_forward=forward_with_exits)
    again = cached_finetune(copy.deepcopy(tiny_lms["llama"]), PAIRS, settings, token_exits=exits,
                            exits={"hash": "toy"}, cache_dir=tmp_path, progress=False)
    assert again.loaded and again.key == made.key
    assert torch.equal(again.extra["token_to_layer"], token_map)


def test_the_fine_tune_in_place_is_not_applied_twice_and_a_new_one_starts_from_it(tiny_lms, tmp_path):
    bb = copy.deepcopy(tiny_lms["llama"])
    settings = GenerationFinetune(loss="joint", max_epochs=1, batch_size=4)
    first = cached_finetune(bb, PAIRS, settings, cache_dir=tmp_path, progress=False)
    after = weights_of(bb)
    again = cached_finetune(bb, PAIRS, settings, cache_dir=tmp_path, progress=False)
    assert again is first and all(torch.equal(after[k], v) for k, v in weights_of(bb).items())
    other = cached_finetune(bb, PAIRS, GenerationFinetune(max_epochs=1, batch_size=4), cache_dir=tmp_path,
                            progress=False)
    assert not other.loaded and other.key != first.key  # a last-layer fine-tune on top of the joint one
    fresh = copy.deepcopy(tiny_lms["llama"])  # the same last-layer budget from the loaded weights: another entry
    assert cached_finetune(fresh, PAIRS, GenerationFinetune(max_epochs=1, batch_size=4), cache_dir=tmp_path,
                           progress=False).key not in (first.key, other.key)


def test_finetune_lm_trains_on_the_data_modules_pairs_as_the_lm_head_encodes_them(tiny_lms, tmp_path):
    import pandas as pd

    from raee.data import TextClassificationDataModule
    from raee.generation import LMHead

    frame = pd.DataFrame({"article": [f"article {i} about the markets" for i in range(12)],
                          "headline": [f"markets {i}" for i in range(12)]})
    frame.to_csv(tmp_path / "pairs.csv", index=False)
    dm = TextClassificationDataModule("local", file=str(tmp_path / "pairs.csv"), text_column="article",
                                      target_column="headline", task_type="generation", batch_size=4)
    bb = copy.deepcopy(tiny_lms["llama"])
    head = LMHead()
    head.bind(bb, dm)
    pairs = training_pairs(head, dm)
    train = dm.split("train")
    assert len(pairs) == len(train)
    ids, n = head.encode_example(train.texts[0], train.targets[0])
    assert list(pairs[0][0]) == ids[:n] and list(pairs[0][1]) == ids[n:] and pairs[0][1][-1] == head.end_id
    record = finetune_lm(bb, head, dm, loss="last", settings={"max_epochs": 1, "lr": 1e-3, "seed": 1},
                         cache_dir=tmp_path / "cache")
    assert record["steps"] == -(-len(train) // 4) and record["batch_size"] == 4 and record["loaded"] is False
    assert record["epochs"] == 1 and record["lr"] == 1e-3 and record["seed"] == 1
    again = finetune_lm(copy.deepcopy(tiny_lms["llama"]), head, dm, loss="last",
                        settings={"max_epochs": 1, "lr": 1e-3, "seed": 1}, cache_dir=tmp_path / "cache")
    assert again["loaded"] is True and again["cache"] == record["cache"]
    # the strategy's other settings key a token-exit fine-tune, not the others
    exits = lambda ids, mask, reads: torch.full_like(ids, bb.num_layers)  # noqa: E731
    a = finetune_lm(copy.deepcopy(tiny_lms["llama"]), head, dm, loss="token_exits", token_exits=exits,
                    settings={"max_epochs": 1, "hash": "random"}, cache_dir=tmp_path / "cache")
    b = finetune_lm(copy.deepcopy(tiny_lms["llama"]), head, dm, loss="token_exits", token_exits=exits,
                    settings={"max_epochs": 1, "hash": "frequency"}, cache_dir=tmp_path / "cache")
    assert a["cache"] != b["cache"]
    c = finetune_lm(copy.deepcopy(tiny_lms["llama"]), head, dm, loss="joint",
                    settings={"max_epochs": 1, "method": "calm_joint"}, cache_dir=tmp_path / "cache")
    d = finetune_lm(copy.deepcopy(tiny_lms["llama"]), head, dm, loss="joint",
                    settings={"max_epochs": 1, "method": "shared"}, cache_dir=tmp_path / "cache")
    assert c["cache"] == d["cache"] and d["loaded"]  # one joint fine-tune, whoever asks for it


def test_head_finetune_is_the_runs_shared_model_and_hashee_keeps_its_own(tiny_lms, tmp_path):
    import pandas as pd

    from raee.data import TextClassificationDataModule
    from raee.generation import FullGeneration, LMHead
    from raee.generation.experiment import run_generation_experiment
    from raee.generation.hashee import HashEEGeneration
    from raee.hashee.strategy import HashEEExit

    frame = pd.DataFrame({"article": [f"article {i} about the markets" for i in range(16)],
                          "headline": [f"markets {i}" for i in range(16)]})
    frame.to_csv(tmp_path / "pairs.csv", index=False)
    dm = TextClassificationDataModule("local", file=str(tmp_path / "pairs.csv"), text_column="article",
                                      target_column="headline", task_type="generation", batch_size=4,
                                      max_new_tokens=4)
    budget = {"max_epochs": 1, "lr": 1e-3, "warmup": 0.1, "weight_decay": 0.01, "seed": 3}
    with pytest.raises(UserError, match="head.finetune"):
        LMHead(finetune="kl")
    bb = copy.deepcopy(tiny_lms["llama"])
    start = weights_of(bb)
    head = LMHead(finetune="joint", budget=budget)
    summary = run_generation_experiment(bb, head, FullGeneration(), dm, output_dir=tmp_path / "full",
                                        cache_dir=tmp_path / "cache", progress=False, compare_full=False)
    assert summary["budget"]["by"] == "generation fine-tune (joint loss)" and summary["budget"]["seed"] == 3
    assert head.describe()["finetune"] == {"loss": "joint", **budget}
    assert any(not torch.equal(start[k], v) for k, v in weights_of(bb).items())
    # HashEE fine-tunes its own copy from the starting weights: the run's shared fine-tune is not applied first
    bb2 = copy.deepcopy(tiny_lms["llama"])
    hashee = HashEEGeneration(HashEEExit(hash="none", last_layer=None, max_epochs=1, lr=1e-3))
    calls = []
    original = LMHead.fit
    LMHead.fit = lambda self, *a, **k: calls.append(1)  # noqa: E731
    try:
        run_generation_experiment(bb2, LMHead(finetune="joint", budget=budget), hashee, dm,
                                  output_dir=tmp_path / "hashee", cache_dir=tmp_path / "cache", progress=False,
                                  compare_full=False)
    finally:
        LMHead.fit = original
    assert not calls and hashee.budget()["by"] == "generation fine-tune (token_exits loss)"


@pytest.mark.parametrize("tokens", ["all", "prompt"])
def test_the_trainers_teacher_forced_pass_with_exits_equals_the_incremental_decode(tiny_lms, tokens):
    """What the HashEE fine-tune trains on is what decoding computes: greedy-decode with the hash exits, then run the
    (prompt, generated) pairs through the trainer's batch (right padding, read positions, the strategy's exits): the
    states it reads the loss from predict exactly the generated tokens, in a batch of mixed lengths."""
    from raee.generation import HashEEGeneration
    from raee.hashee.strategy import HashEEExit

    bb = tiny_lms["llama"]
    strategy = HashEEGeneration(HashEEExit(hash="random", last_layer=None, max_epochs=0, tokens=tokens))
    strategy.prepare(bb, None)
    vocab = int(bb.model.get_input_embeddings().weight.shape[0])
    strategy.use_token_map(torch.randint(1, bb.num_layers + 1, (vocab,), generator=torch.Generator().manual_seed(4)))
    prompts = [p for p, _ in PAIRS]
    out = strategy.generate(bb, prompts, 6, set())
    module = ft.GenerationFinetuning(bb, "token_exits", lr=1e-3, weight_decay=0.0, warmup=0.0,
                                     token_exits=strategy.token_exits)
    batch = collate_pairs(list(zip(prompts, out.tokens)), pad_id=0)
    with torch.no_grad():
        hidden = module.exit_forward(bb, batch["input_ids"], batch["attention_mask"], module.exit_layers(batch))
        positions, labels = prediction_positions(batch["target_mask"], batch["input_ids"])
        predicted = bb.lm_logits(hidden[positions[:, 0], positions[:, 1]]).argmax(-1)
    assert predicted.tolist() == labels.tolist() == [t for row in out.tokens for t in row]
    if tokens == "all":
        assert any(layer < bb.num_layers for row in out.exit_layers for layer in row)  # exits did happen


def test_hash_none_equals_the_full_model(tiny_lms):
    from raee.generation import FullGeneration, HashEEGeneration
    from raee.hashee.strategy import HashEEExit

    bb = tiny_lms["gpt2"]
    none = HashEEGeneration(HashEEExit(hash="none", last_layer=None, max_epochs=0))
    none.prepare(bb, None)
    none.use_token_map(none.build_token_map(bb, None))
    full = FullGeneration()
    full.prepare(bb, None)
    prompts = [p for p, _ in PAIRS]
    a, b = none.generate(bb, prompts, 8, set()), full.generate(bb, prompts, 8, set())
    assert a.tokens == b.tokens and a.exit_layers == b.exit_layers
    assert a.flops.summary()["flops_speedup"] == pytest.approx(1.0)


def test_every_fine_tune_of_compare_generation_shares_the_one_budget():
    """+experiment=compare_generation: the zero-shot model, the shared joint fine-tune (head.finetune) for full,
    fixed, confidence and self_speculative, and HashEE's own fine-tunes: every one reads the same `finetune`
    budget and seed, on the same backbone and data."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from raee.generation import for_generation
    from raee.run import CONF_DIR
    from tests.test_union_sweeper import compose_jobs, jobs

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+experiment=compare_generation"], return_hydra_config=True)
        sweeper = cfg.hydra.sweeper
        all_jobs = jobs(OmegaConf.to_container(sweeper.params) if sweeper.params else {},
                        OmegaConf.to_container(sweeper.sweeps))
        budgets, wants, methods, zero_shot = set(), set(), set(), 0
        for job, job_cfg in compose_jobs("compare_generation", all_jobs):
            ft_cfg = job_cfg.finetune
            want = (ft_cfg.max_epochs, ft_cfg.lr, ft_cfg.warmup, ft_cfg.weight_decay, job_cfg.seed)
            wants.add(want)
            assert job_cfg.backbone.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct", job
            assert (job_cfg.data.max_source_tokens, job_cfg.data.max_train_examples) == (64, 400), job
            strategy = for_generation(instantiate(job_cfg.exit))
            methods.add(strategy.name)
            head = OmegaConf.to_container(job_cfg.head, resolve=True)
            if strategy.name == "hashee":
                s = strategy.settings
                budgets.add((s.max_epochs, s.lr, s.warmup, s.weight_decay, s.seed))
                assert "finetune" not in head  # its own fine-tune, from the starting weights
            elif head.get("finetune") == "joint":
                b = head["budget"]
                budgets.add((b["max_epochs"], b["lr"], b["warmup"], b["weight_decay"], b["seed"]))
                if strategy.name == "confidence":  # its own joint fine-tune is the same entry as the head's
                    s = strategy.finetune_settings
                    assert (s["max_epochs"], s["lr"], s["warmup"], s["weight_decay"], s["seed"]) == want
            else:
                zero_shot += 1
                assert strategy.name == "full" and head.get("finetune") is None
    assert len(wants) == 1 and budgets == wants and zero_shot == 1
    assert methods == {"full", "fixed", "confidence", "self_speculative", "hashee"}
