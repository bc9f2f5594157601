"""Prompt head: label-word rows of the LM head, verbalizer tokens, templates, dataset defaults, calibration."""

from __future__ import annotations

import warnings

import pytest
import torch

from raee.backbones import load_backbone
from raee.backbones.lm_head import split_lm_head
from raee.experiment import prepare_head
from raee.heads import PromptHead
from raee.heads.verbalizer import check_template, label_token_ids
from tests.conftest import TEXTS, TINY_CONFIGS, toy_datamodule

FAMILIES = sorted(TINY_CONFIGS) + ["electra"]
ELECTRA = dict(model_type="electra", num_hidden_layers=2, hidden_size=32, embedding_size=16, num_attention_heads=4,
               intermediate_size=64)
PROMPTS = {"mlm": {"template": "{text} It was {mask}.", "label_words": {"neg": "bad", "pos": "good"}},
           "causal": {"template": "Review: {text}\nSentiment:", "label_words": {"neg": "negative", "pos": "positive"}}}


def _backbone(tiny_backbones, family):
    return tiny_backbones[family] if family in tiny_backbones else load_backbone(tiny=ELECTRA, max_length=64)


@pytest.mark.parametrize("family", FAMILIES)
def test_label_rows_equal_the_full_lm_head_at_those_rows(tiny_backbones, family):
    bb = _backbone(tiny_backbones, family)
    torch.manual_seed(0)
    hidden = torch.randn(5, bb.hidden_size)
    ids = torch.tensor([7, 1003, 42, 7])  # any order, repeats allowed
    full = bb.lm_logits(hidden)
    # the full path is still the model's own LM head module (after the final norm)
    torch.testing.assert_close(full, bb.lm_head(bb.final_norm(hidden)), atol=1e-5, rtol=1e-5)
    rows = bb.lm_logits(hidden, ids)
    assert rows.shape == (5, 4)
    torch.testing.assert_close(rows, full[:, ids], atol=1e-5, rtol=1e-5)


def test_unknown_lm_head_layout_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="add its layout to raee/backbones/lm_head.py"):
        split_lm_head(torch.nn.GELU())


def test_prompt_head_scores_only_the_label_rows(tiny_backbones):
    bb = tiny_backbones["gpt2"]
    head = PromptHead(dataset_prompts=PROMPTS)
    head.bind(bb, ["neg", "pos"])
    seen = []
    projection = split_lm_head(bb.lm_head)[1]
    handle = projection.register_forward_hook(lambda *a: seen.append("full vocabulary"))
    try:
        texts, _ = head.format(TEXTS[:2], None, bb)
        logits = head(bb.all_layers(**bb.tokenize(texts))[1])
    finally:
        handle.remove()
    assert logits.shape == (2, 2) and seen == []  # the vocabulary projection module never ran


# ----------------------------------------------------------------------------- label words

def test_multi_token_label_word_is_scored_by_its_first_token(tiny_backbones):
    tok = tiny_backbones["bert"].tokenizer
    with pytest.warns(UserWarning, match="scored by their first token"):
        ids = label_token_ids(tok, ["bad", "unbelievablyxyzzy"], "tiny")
    assert ids[1] == tok(" unbelievablyxyzzy", add_special_tokens=False)["input_ids"][0]
    assert ids[0] == tok.convert_tokens_to_ids("bad")


def test_label_words_sharing_a_first_token_are_refused(tiny_backbones):
    head = PromptHead(template="{text} it was {mask}.", label_words=["unbelievablyxyzzy", "unbelievablyqqq"])
    with warnings.catch_warnings(), pytest.raises(ValueError, match=r"'unbelievablyxyzzy' .* and 'unbelievablyqqq' "
                                                                    r".*share their first token .*Choose label words"):
        warnings.simplefilter("ignore")
        head.bind(tiny_backbones["bert"], ["neg", "pos"])


class _SpaceMarkerTokenizer:
    """SentencePiece-like: a word in the vocabulary is one '▁word' token, any other word is a bare '▁'
    followed by its characters (with or without a leading space, as SentencePiece adds one anyway)."""

    vocab = ["▁", "▁yes", "▁no", "z"]

    def __call__(self, text, add_special_tokens=False):
        ids = []
        for word in text.split():
            ids += [self.vocab.index("▁" + word)] if "▁" + word in self.vocab else [0] + [self.vocab.index(c)
                                                                                          for c in word]
        return {"input_ids": ids}

    def decode(self, ids):
        return "".join(self.vocab[i].replace("▁", " ") for i in ids)

    def convert_ids_to_tokens(self, ids):
        return [self.vocab[i] for i in ids]


def test_label_word_behind_a_bare_marker_token_is_refused():
    tok = _SpaceMarkerTokenizer()
    assert label_token_ids(tok, ["yes", "no"], "stub") == [1, 2]
    with pytest.raises(ValueError, match=r"'zz' splits ambiguously .*\['▁', 'z', 'z'\].*bare space"):
        label_token_ids(tok, ["yes", "zz"], "stub")


def test_label_words_by_name_or_in_order_and_count_checked(tiny_backbones):
    bb = tiny_backbones["bert"]
    by_name = PromptHead(template="{text} it was {mask}.", label_words={"pos": "good", "neg": "bad"})
    by_name.bind(bb, ["neg", "pos"])
    assert by_name.prompt_words == ["bad", "good"]
    with pytest.raises(ValueError, match=r"no word for classes \['other'\]"):
        by_name.bind(bb, ["neg", "other"])
    with pytest.raises(ValueError, match="2 words but the dataset has 3 classes"):
        PromptHead(template="{text} {mask}", label_words=["bad", "good"]).bind(bb, ["a", "b", "c"])
    from omegaconf import OmegaConf

    from_config = PromptHead(template="{text} {mask}", label_words=OmegaConf.create(["bad", "good"]))
    from_config.bind(bb, ["neg", "pos"])
    assert from_config.describe()["label_words"] == ["bad", "good"]


# ----------------------------------------------------------------------------- templates

@pytest.mark.parametrize("template,decoder,message", [
    ("It was {mask}.", False, "no {text} placeholder"),
    ("It was {mask}.", True, "no {text} placeholder"),
    ("{text} It was great.", False, "has no {mask}: an encoder"),
    ("{text} It was {mask}.", True, "puts {mask} before the end"),
    ("{text} {mask} {mask}", False, "2 {mask} placeholders"),
    ("{sentence} It was {mask}.", False, r"unknown placeholder\(s\) \['sentence'\]"),
    ("{text} It was {mask", False, "malformed"),
])
def test_bad_templates_are_refused(template, decoder, message):
    with pytest.raises(ValueError, match=message):
        check_template(template, decoder=decoder)


def test_decoder_template_ends_at_the_answer_slot():
    assert check_template("Review: {text}\nSentiment: {mask}", decoder=True) == "Review: {text}\nSentiment:"
    assert check_template("{text} The answer is ", decoder=True) == "{text} The answer is"
    assert check_template("{mask}: {text}", decoder=False) == "{mask}: {text}"  # LM-BFF's TREC (encoders)


def test_bad_template_given_to_the_head_fails_at_construction_or_bind(tiny_backbones):
    with pytest.raises(ValueError, match="no {text}"):
        PromptHead(template="It was {mask}.", label_words=["bad", "good"])
    head = PromptHead(template="{text} It was {mask}.", label_words=["bad", "good"])
    with pytest.raises(ValueError, match="before the end"):
        head.bind(tiny_backbones["gpt2"], ["neg", "pos"])


# ----------------------------------------------------------------------------- dataset defaults

@pytest.mark.parametrize("family,kind", [("bert", "mlm"), ("roberta", "mlm"), ("gpt2", "causal"),
                                         ("llama", "causal")])
def test_default_prompt_is_chosen_by_the_backbone_kind(tiny_backbones, family, kind):
    bb = tiny_backbones[family]
    head = PromptHead(dataset_prompts=PROMPTS)
    head.bind(bb, ["neg", "pos"])
    assert head.kind == kind
    assert head.prompt_words == list(PROMPTS[kind]["label_words"].values())
    expected = check_template(PROMPTS[kind]["template"], decoder=bb.is_decoder)
    assert head.prompt_template == expected and head.describe()["template"] == expected
    texts, _ = head.format(TEXTS[:2], None, bb)
    assert head(bb.all_layers(**bb.tokenize(texts))[-1]).shape == (2, 2)


def test_user_overrides_win_over_dataset_defaults(tiny_backbones):
    head = PromptHead(template="Text: {text}\nLabel:", dataset_prompts=PROMPTS)
    head.bind(tiny_backbones["gpt2"], ["neg", "pos"])
    assert head.prompt_template == "Text: {text}\nLabel:" and head.prompt_words == ["negative", "positive"]
    head = PromptHead(label_words=["bad", "good"], dataset_prompts=PROMPTS)
    head.bind(tiny_backbones["gpt2"], ["neg", "pos"])
    assert head.prompt_template == PROMPTS["causal"]["template"] and head.prompt_words == ["bad", "good"]


def test_no_template_and_no_dataset_prompt_names_the_fix(tiny_backbones):
    with pytest.raises(ValueError, match=r"no template and no label words .*the data config has no `prompt:` "
                                         r"section.*head.template="):
        PromptHead().bind(tiny_backbones["gpt2"], ["neg", "pos"])
    only_mlm = {"mlm": PROMPTS["mlm"]}
    with pytest.raises(ValueError, match="has no complete `causal` entry"):
        PromptHead(dataset_prompts=only_mlm).bind(tiny_backbones["gpt2"], ["neg", "pos"])


def test_head_prompt_with_a_data_config_without_prompts_fails_clearly():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from raee.run import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["head=prompt", "data=csv", "backbone=tiny_gpt2"])
    head = instantiate(cfg.head)
    assert head.dataset_prompts is None
    with pytest.raises(ValueError, match="the data config has no `prompt:` section"):
        head.bind(instantiate(cfg.backbone), ["neg", "pos"])


def test_pair_data_needs_a_text_pair_slot(tiny_backbones):
    head = PromptHead(template="{text} It was {mask}.", label_words=["bad", "good"])
    head.bind(tiny_backbones["bert"], ["neg", "pos"])
    with pytest.raises(ValueError, match="has no {text_pair}"):
        head.format(["a"], ["b"], tiny_backbones["bert"])


# ----------------------------------------------------------------------------- truncation

@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_truncation_cuts_the_text_never_the_answer_position(family):
    bb = load_backbone(tiny=TINY_CONFIGS[family], max_length=32)
    head = PromptHead(dataset_prompts=PROMPTS)
    head.bind(bb, ["neg", "pos"])
    texts, _ = head.format(["word " * 300, "short"], None, bb)
    enc = bb.tokenize(texts)
    assert int(enc["attention_mask"][0].sum()) <= 32
    if bb.is_decoder:  # the prompt's last tokens survive: the next token is still the answer
        tail = bb.tokenizer("\nSentiment:", add_special_tokens=False)["input_ids"]
        state = bb.embed(**enc)
        for row, read in enumerate(head.positions(state).tolist()):
            assert enc["input_ids"][row, read + 1 - len(tail):read + 1].tolist() == tail
    else:
        assert (enc["input_ids"] == bb.tokenizer.mask_token_id).any(1).all()


def test_template_longer_than_max_length_is_refused():
    bb = load_backbone(tiny=TINY_CONFIGS["gpt2"], max_length=16)
    head = PromptHead(template="{text} " + "a very long instruction " * 10, label_words=["bad", "good"])
    with pytest.raises(ValueError, match="raise backbone.max_length"):
        head.bind(bb, ["neg", "pos"])


# ----------------------------------------------------------------------------- calibration

@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_content_free_input_is_uniform_at_every_layer_after_calibration(tiny_backbones, family):
    bb = tiny_backbones[family]
    head = PromptHead(dataset_prompts=PROMPTS, calibration="content_free", content_free_inputs=["N/A"])
    head.bind(bb, ["neg", "pos"])
    with pytest.raises(RuntimeError, match="not fitted"):
        head(bb.embed(**bb.tokenize(head.format(["x"], None, bb)[0])))
    head.fit(bb, None)
    assert head.content_free_probs.shape == (bb.num_layers + 1, 2)
    texts, _ = head.format(["N/A", TEXTS[0]], None, bb)
    states = bb.all_layers(**bb.tokenize(texts))
    for state in states:
        probs = torch.softmax(head(state), -1)
        torch.testing.assert_close(probs[0], torch.full((2,), 0.5), atol=1e-5, rtol=0)
        raw = torch.softmax(head.label_logits(state).float(), -1)[1]
        expected = raw / head.content_free_probs[state.layer]
        torch.testing.assert_close(probs[1], expected / expected.sum(), atol=1e-5, rtol=1e-5)


def test_mask_token_among_content_free_inputs_does_not_add_an_answer_slot(tiny_backbones):
    bb = tiny_backbones["bert"]
    head = PromptHead(dataset_prompts=PROMPTS, calibration="content_free")  # default inputs include "[MASK]"
    head.bind(bb, ["neg", "pos"])
    texts, _ = head.format(["[MASK]"], None, bb)
    assert (bb.tokenize(texts)["input_ids"] == bb.tokenizer.mask_token_id).sum() == 1
    head.fit(bb, None)
    assert torch.isfinite(head.content_free_probs).all()


def head_entries(cache_dir):
    """Cached heads, without the hidden lock files a build leaves beside them."""
    return [p for p in (cache_dir / "heads").iterdir() if not p.name.startswith(".")]


def test_calibration_is_cached_with_the_head_and_its_settings_change_the_key(tiny_backbones, tmp_path, monkeypatch):
    bb, dm = tiny_backbones["gpt2"], toy_datamodule(6)
    dm.label_names = ["neg", "pos", "other"]
    prompts = {"causal": {"template": "{text}\nTopic:", "label_words": ["sport", "money", "film"]}}

    def prepared(**kwargs):
        head = PromptHead(dataset_prompts=prompts, **kwargs)
        prepare_head(bb, head, dm, cache_dir=tmp_path, progress=False)
        return head

    first = prepared(calibration="content_free", content_free_inputs=["N/A"])
    assert len(head_entries(tmp_path)) == 1
    monkeypatch.setattr(PromptHead, "fit", lambda *a, **k: pytest.fail("a cached calibration must be loaded"))
    again = prepared(calibration="content_free", content_free_inputs=["N/A"])
    torch.testing.assert_close(again.content_free_probs, first.content_free_probs)
    monkeypatch.undo()
    other = prepared(calibration="content_free", content_free_inputs=["N/A", ""])
    assert len(head_entries(tmp_path)) == 2
    assert not torch.allclose(other.content_free_probs, first.content_free_probs)
    plain = prepared()
    assert "calibration" not in plain.describe() and len(head_entries(tmp_path)) == 2


def test_unknown_calibration_is_refused():
    with pytest.raises(ValueError, match="head.calibration='zhao' is unknown"):
        PromptHead(calibration="zhao")
