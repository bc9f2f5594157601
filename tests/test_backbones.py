"""The layer-by-layer path must equal the Hugging Face model's own forward pass."""

from __future__ import annotations

import pytest
import torch

from raee.backbones import load_backbone, resolve_model_source
from tests.conftest import TEXTS, TINY_CONFIGS, assert_backbone_matches_hf_lm, assert_layers_match_hf


def _assert_matches_its_hf_forward(bb) -> None:
    enc = bb.tokenize(TEXTS)
    assert (enc["attention_mask"] == 0).any(), "the batch must contain padding to test masking"
    states = bb.all_layers(**enc)
    with torch.no_grad():
        ref = bb.model(**enc, output_hidden_states=True).hidden_states
    assert_layers_match_hf(bb, states, ref, enc["attention_mask"])


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_layerwise_hidden_states_match_hf(tiny_backbones, family):
    _assert_matches_its_hf_forward(tiny_backbones[family])


#: Gemma-3 whose logits are soft-capped hard enough (cap 0.5) that a missing cap shows
GEMMA3_SOFTCAP = dict(TINY_CONFIGS["gemma3"], final_logit_softcapping=0.5)


@pytest.mark.parametrize("config", [TINY_CONFIGS["bert"], TINY_CONFIGS["gpt2"], TINY_CONFIGS["llama"], GEMMA3_SOFTCAP],
                         ids=["bert", "gpt2", "llama", "gemma3_softcap"])
def test_lm_logits_match_hf_lm_head(config):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    bb = load_backbone(tiny=config, seed=3)
    # rebuild the same random model (same seed) as a full HF LM and compare final logits
    torch.manual_seed(3)
    cls = AutoModelForCausalLM if bb.is_decoder else AutoModelForMaskedLM
    lm = cls.from_config(bb.model.config).eval()
    states, enc = assert_backbone_matches_hf_lm(bb, lm, TEXTS[:3])
    ours = bb.lm_logits(states[-1].hidden)
    real = enc["attention_mask"].bool()
    if config is GEMMA3_SOFTCAP:  # the cap changed the logits: without it the comparison above fails
        uncapped = bb.lm_head(bb.final_norm(states[-1].hidden))
        assert (uncapped[real] - ours[real]).abs().max() > 0.1
        assert ours.abs().max() <= 0.5


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_decoder_survivors_after_select_equal_a_run_without_the_others(tiny_backbones, family):
    """Examples that stay after others exit (and their padding is trimmed) get the same later layers
    as a batch that never held the others."""
    bb = tiny_backbones[family]
    enc = bb.tokenize(TEXTS)
    keep = torch.tensor([True, False, True, False, True, True])  # drops the longest text: padding is trimmed
    state = bb.run_layer(bb.embed(**enc))
    state = bb.select(state, keep)
    alone = bb.tokenize([t for t, k in zip(TEXTS, keep) if k])
    assert state.hidden.shape[1] == alone["input_ids"].shape[1] < enc["input_ids"].shape[1]
    ref = bb.all_layers(**alone)
    real = alone["attention_mask"].bool()
    for layer in range(2, bb.num_layers + 1):
        state = bb.run_layer(state)
        torch.testing.assert_close(state.hidden[real], ref[layer].hidden[real], atol=1e-5, rtol=1e-5)


def test_gemma3_sliding_and_global_layers_get_their_own_masks(tiny_backbones):
    bb = tiny_backbones["gemma3"]
    assert bb.layer_types == ["sliding_attention", "full_attention"] * 2
    enc = bb.tokenize(TEXTS)
    assert enc["attention_mask"].sum(1).max() > bb.model.config.sliding_window  # the window cuts some tokens off
    masks = bb.embed(**enc).extras["masks"]
    assert not torch.equal(masks["sliding_attention"], masks["full_attention"])


@pytest.mark.parametrize("config,attn", [
    (dict(model_type="gemma", num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=1,
          head_dim=8, intermediate_size=64), "sdpa"),
    # Gemma-2 has no sdpa path in transformers; its logits are soft-capped at 30 by default
    (dict(model_type="gemma2", num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
          head_dim=8, intermediate_size=64, query_pre_attn_scalar=8, sliding_window=4), "eager"),
], ids=["gemma", "gemma2"])
def test_other_gemma_generations_match_hf(config, attn):
    _assert_matches_its_hf_forward(load_backbone(tiny=config, attn_implementation=attn))


def test_multimodal_gemma3_checkpoint_runs_its_text_model(tmp_path):
    """A saved Gemma3ForConditionalGeneration (Gemma-3 4B+) loads as its text model with the LM head."""
    from transformers import AutoConfig, AutoModelForCausalLM

    text = {k: v for k, v in TINY_CONFIGS["gemma3"].items() if k != "model_type"}
    config = AutoConfig.for_model("gemma3", text_config=dict(text, vocab_size=30522), mm_tokens_per_image=4,
                                  vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, image_size=28, patch_size=14))
    torch.manual_seed(4)
    lm = AutoModelForCausalLM.from_config(config).eval()
    assert type(lm).__name__ == "Gemma3ForConditionalGeneration"
    lm.save_pretrained(tmp_path)
    load_backbone("all-MiniLM-L6-v2").tokenizer.save_pretrained(tmp_path)
    bb = load_backbone(str(tmp_path))
    assert type(bb.model).__name__ == "Gemma3TextModel" and bb.num_layers == 4 and bb.has_lm_head
    assert_backbone_matches_hf_lm(bb, lm, TEXTS)


def test_bidirectional_gemma_is_refused():
    with pytest.raises(ValueError, match="bidirectional attention"):
        load_backbone(tiny=dict(TINY_CONFIGS["gemma3"], use_bidirectional_attention=True))


def test_select_drops_examples_and_trims_padding(tiny_bert):
    enc = tiny_bert.tokenize(TEXTS)
    state = tiny_bert.embed(**enc)
    keep = torch.tensor([False, True, True, False, True, True])
    sub = tiny_bert.select(state, keep)
    assert sub.batch_size == 4
    assert sub.hidden.shape[1] == int(enc["attention_mask"][keep].sum(1).max())
    # running the survivors alone gives the same states as running everyone then selecting
    full_next = tiny_bert.run_layer(state)
    sub_next = tiny_bert.run_layer(sub)
    mask = sub.attention_mask.bool()
    torch.testing.assert_close(sub_next.hidden[mask], full_next.hidden[keep][:, : sub.hidden.shape[1]][mask],
                               atol=1e-5, rtol=1e-5)


def test_layer_counter_counts_examples(tiny_bert):
    enc = tiny_bert.tokenize(TEXTS[:2])
    tiny_bert.all_layers(**enc)
    assert tiny_bert.layer_examples == [0] + [2] * tiny_bert.num_layers


def test_offline_default_model_resolves_to_installed_package():
    path = resolve_model_source("sentence-transformers/all-MiniLM-L6-v2")
    assert path.endswith("model")


def test_unknown_backbone_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone(str(tmp_path / "no_such_model"))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_backbone(str(empty))


def test_unsupported_family_is_a_clear_error():
    with pytest.raises(ValueError, match="unsupported backbone model_type 't5'"):
        load_backbone(tiny=dict(model_type="t5"))


def test_exactly_one_source_is_required():
    with pytest.raises(ValueError, match="exactly one"):
        load_backbone()


def test_backbone_configs_of_the_causal_lms():
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from raee.assets import GEMMA3_270M_GGUF, SMOLLM2_GGUF
    from raee.backbones import PACKAGED_GGUF, GemmaBackbone
    from raee.run import CONF_DIR

    for option, asset in (("smollm2", SMOLLM2_GGUF), ("gemma3_270m", GEMMA3_270M_GGUF)):
        cfg = OmegaConf.load(Path(CONF_DIR) / "backbone" / f"{option}.yaml")
        assert PACKAGED_GGUF[cfg.name_or_path] is asset and cfg.packaged is True  # offline by default
    tiny = instantiate(OmegaConf.load(Path(CONF_DIR) / "backbone" / "tiny_gemma3.yaml"))
    assert isinstance(tiny, GemmaBackbone) and tiny.layer_types == ["sliding_attention", "full_attention"] * 2
