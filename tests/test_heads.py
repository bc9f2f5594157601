"""Prompt, prototype and linear heads: shapes, correctness against HF, training and reloading."""

from __future__ import annotations

import pytest
import torch

from raee.backbones import load_backbone
from raee.experiment import prepare_head
from raee.heads import LinearHead, PromptHead, PrototypeHead
from tests.conftest import TEXTS, TINY_CONFIGS, toy_datamodule


def test_prompt_head_reads_label_words_at_the_mask_through_the_mlm_head():
    from transformers import AutoModelForMaskedLM

    bb = load_backbone(tiny=TINY_CONFIGS["bert"], seed=5)
    head = PromptHead(template="{text} it was {mask}.", label_words=["bad", "good"])
    head.bind(bb, ["neg", "pos"])
    texts, _ = head.format(TEXTS[:3], None, bb)
    assert all("[MASK]" in t for t in texts)
    enc = bb.tokenize(texts)
    states = bb.all_layers(**enc)
    logits = head(states[-1])
    assert logits.shape == (3, 2)
    torch.manual_seed(5)
    lm = AutoModelForMaskedLM.from_config(bb.model.config).eval()
    with torch.no_grad():
        ref = lm(**enc).logits
    pos = (enc["input_ids"] == bb.tokenizer.mask_token_id).float().argmax(1)
    ids = [bb.tokenizer.convert_tokens_to_ids(w) for w in ("bad", "good")]
    torch.testing.assert_close(logits, ref[torch.arange(3), pos][:, ids], atol=1e-4, rtol=1e-4)
    # every layer gives logits of the same shape (layer 0 = embeddings)
    assert all(head(s).shape == (3, 2) for s in states)


def test_prompt_head_on_a_decoder_reads_the_last_real_token():
    bb = load_backbone(tiny=TINY_CONFIGS["gpt2"], seed=1)
    head = PromptHead(template="{text} topic:", label_words=["sport", "money", "film"])
    head.bind(bb, ["a", "b", "c"])
    texts, _ = head.format(TEXTS, None, bb)
    enc = bb.tokenize(texts)
    states = bb.all_layers(**enc)
    logits = head(states[2])
    # the tiny decoders borrow a BERT tokenizer, which appends [SEP]: the head reads the token before it
    last = enc["attention_mask"].sum(1) - 2
    assert (enc["input_ids"][torch.arange(len(TEXTS)), last + 1] == bb.tokenizer.sep_token_id).all()
    hidden = states[2].hidden[torch.arange(len(TEXTS)), last]
    full = bb.lm_head(bb.final_norm(hidden))
    torch.testing.assert_close(logits, full[:, head.label_ids])


def test_prompt_keeps_the_mask_when_the_text_is_too_long():
    bb = load_backbone(tiny=TINY_CONFIGS["bert"], max_length=32)
    head = PromptHead(template="{text} it was {mask}.", label_words=["bad", "good"])
    head.bind(bb, ["neg", "pos"])
    texts, _ = head.format(["word " * 200], None, bb)
    enc = bb.tokenize(texts)
    assert (enc["input_ids"] == bb.tokenizer.mask_token_id).any()


def test_label_words_must_match_class_count(tiny_backbones):
    with pytest.raises(ValueError, match="2 words but the dataset has 3 classes"):
        PromptHead(template="{text} {mask}", label_words=["bad", "good"]).bind(tiny_backbones["bert"], ["a", "b", "c"])


def test_prompt_head_needs_an_lm_head():
    bb = load_backbone("sentence-transformers/all-MiniLM-L6-v2")
    with pytest.raises(ValueError, match="no language-model head"):
        PromptHead(label_words=["bad", "good"]).bind(bb, ["neg", "pos"])


def test_prototype_head_is_the_class_mean_and_classifies_its_own_prototypes(tiny_bert, tmp_path):
    dm = toy_datamodule(12)
    head = PrototypeHead(pooling="mean", center=False)
    prepare_head(tiny_bert, head, dm, cache_dir=None, progress=False)
    assert head.prototypes.shape == (5, 3, 32)
    torch.testing.assert_close(head.prototypes.norm(dim=-1), torch.ones(5, 3))
    # the prototype at layer 2 of class c is the normalised mean of class c's pooled states
    enc = tiny_bert.tokenize(dm.texts)
    states = tiny_bert.all_layers(**enc)
    pooled = (states[2].hidden * enc["attention_mask"].unsqueeze(-1)).sum(1) / enc["attention_mask"].sum(1, keepdim=True)
    labels = torch.tensor(dm.labels)
    mean1 = torch.nn.functional.normalize(pooled[labels == 1].mean(0), dim=0)
    torch.testing.assert_close(head.prototypes[2, 1], mean1, atol=1e-5, rtol=1e-5)
    assert head(states[3]).shape == (12, 3)
    head.save(tmp_path / "proto")
    other = PrototypeHead(center=False)
    other.bind(tiny_bert, dm.label_names)
    other.load(tmp_path / "proto")
    torch.testing.assert_close(other.prototypes, head.prototypes)


def test_centred_prototypes_subtract_the_layer_mean(tiny_bert):
    dm = toy_datamodule(12)
    head = PrototypeHead(center=True)
    prepare_head(tiny_bert, head, dm, cache_dir=None, progress=False)
    enc = tiny_bert.tokenize(dm.texts)
    state = tiny_bert.all_layers(**enc)[1]
    mask = enc["attention_mask"].unsqueeze(-1)
    pooled = (state.hidden * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(head.centers[1], pooled.mean(0), atol=1e-5, rtol=1e-5)
    labels = torch.tensor(dm.labels)
    expected = torch.nn.functional.normalize(pooled[labels == 2].mean(0) - pooled.mean(0), dim=0)
    torch.testing.assert_close(head.prototypes[1, 2], expected, atol=1e-5, rtol=1e-5)
    logits = head(state)
    want = 10.0 * torch.nn.functional.normalize(pooled - pooled.mean(0), dim=-1) @ head.prototypes[1].T
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)


def test_prototype_fit_is_cached_on_disk(tiny_bert, tmp_path):
    dm = toy_datamodule(9)
    prepare_head(tiny_bert, PrototypeHead(), dm, cache_dir=tmp_path, progress=False)
    calls = tiny_bert.layer_examples[1]
    head = PrototypeHead()
    prepare_head(tiny_bert, head, dm, cache_dir=tmp_path, progress=False)
    assert tiny_bert.layer_examples[1] == calls, "a cached head must not run the backbone again"
    assert head.is_fitted


def test_linear_head_trains_and_reloads(tiny_bert, tmp_path):
    dm = toy_datamodule(24)
    head = LinearHead(max_epochs=15, lr=0.05, dropout=0.0, checkpoint=str(tmp_path / "linear"))
    prepare_head(tiny_bert, head, dm, progress=False)
    enc = tiny_bert.tokenize(dm.texts)
    states = tiny_bert.all_layers(**enc)
    head.eval()
    acc = (head(states[-1]).argmax(-1) == torch.tensor(dm.labels)).float().mean()
    assert acc >= 0.9, f"three separable topics should be learned, got {acc}"
    assert (tmp_path / "linear" / "classifiers.safetensors").exists()
    reloaded = LinearHead(checkpoint=str(tmp_path / "linear"))
    prepare_head(tiny_bert, reloaded, dm, progress=False)
    reloaded.eval()
    for s in states:
        torch.testing.assert_close(reloaded(s), head(s))


def test_linear_head_refuses_a_checkpoint_for_other_classes(tiny_bert, tmp_path):
    dm = toy_datamodule(6)
    head = LinearHead(max_epochs=1, checkpoint=str(tmp_path / "lin"))
    prepare_head(tiny_bert, head, dm, progress=False)
    other = LinearHead()
    other.bind(tiny_bert, ["x", "y"])
    with pytest.raises(ValueError, match="trained for classes"):
        other.load(tmp_path / "lin")


def test_pabee_joint_training_updates_and_restores_the_backbone(tmp_path):
    bb = load_backbone(tiny=TINY_CONFIGS["bert"], seed=0)
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    dm = toy_datamodule(12)
    head = LinearHead(max_epochs=2, lr=0.01, finetune_backbone=True, backbone_lr=1e-2,
                      checkpoint=str(tmp_path / "pabee"))
    assert head.loss_weighting == "pabee"
    prepare_head(bb, head, dm, progress=False)
    weights = head.layer_weights()
    assert torch.allclose(weights, torch.tensor([1.0, 1, 2, 3, 4]) / 11)
    changed = [k for k, v in bb.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "joint training must update the backbone"
    assert not any(p.requires_grad for p in bb.model.parameters()), "the backbone ends frozen"
    fresh = load_backbone(tiny=TINY_CONFIGS["bert"], seed=0)
    reloaded = LinearHead(finetune_backbone=True, checkpoint=str(tmp_path / "pabee"))
    prepare_head(fresh, reloaded, dm, progress=False)
    for k, v in bb.model.state_dict().items():
        torch.testing.assert_close(fresh.model.state_dict()[k], v)


@pytest.mark.parametrize("change", [dict(lr=2e-3), dict(max_epochs=4), dict(seed=7), dict(backbone_lr=3e-5),
                                    dict(warmup=0.2), dict(weight_decay=0.0), dict(dropout=0.2),
                                    dict(gradient_clip_val=None), dict(pooling="cls")])
def test_every_training_setting_changes_the_caches_keyed_on_the_head(tiny_bert, tmp_path, change):
    """A fitted head, and a RAEE database built with it, are cached under keys from head.describe():
    a change of any fine-tuning setting must give new keys, never reuse a stale head or database."""
    from raee.exits import RaeeExit
    from raee.experiment import head_cache_key
    from raee.keys import BackboneKeys

    dm = toy_datamodule(6)
    heads = [LinearHead(finetune_backbone=True), LinearHead(finetune_backbone=True, **change)]
    for head in heads:
        head.bind(tiny_bert, dm.label_names)
    assert heads[0].describe() != heads[1].describe()
    assert len({head_cache_key(tiny_bert, h, dm) for h in heads}) == 2
    raee = RaeeExit(BackboneKeys(), retriever=None, aggregator=None)
    assert len({raee.default_database_dir(tiny_bert, h, dm, tmp_path) for h in heads}) == 2
