"""The layer-by-layer path must equal the Hugging Face model's own forward pass."""

from __future__ import annotations

import pytest
import torch

from raee.backbones import load_backbone, resolve_model_source
from tests.conftest import TEXTS, TINY_CONFIGS


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_layerwise_hidden_states_match_hf(tiny_backbones, family):
    bb = tiny_backbones[family]
    enc = bb.tokenize(TEXTS)
    assert (enc["attention_mask"] == 0).any(), "the batch must contain padding to test masking"
    states = bb.all_layers(**enc)
    with torch.no_grad():
        ref = bb.model(**enc, output_hidden_states=True).hidden_states
    assert len(states) == len(ref) == bb.num_layers + 1
    real = enc["attention_mask"].bool()
    for state, expected in zip(states, ref):
        hidden = state.hidden
        if bb.is_decoder and state.layer == bb.num_layers:  # HF applies the final norm to the last entry
            hidden = bb.final_norm(hidden)
        torch.testing.assert_close(hidden[real], expected[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_lm_logits_match_hf_lm_head(family):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    bb = load_backbone(tiny=TINY_CONFIGS[family], seed=3)
    enc = bb.tokenize(TEXTS[:3])
    states = bb.all_layers(**enc)
    # rebuild the same random model (same seed) as a full HF LM and compare final logits
    torch.manual_seed(3)
    cls = AutoModelForCausalLM if bb.is_decoder else AutoModelForMaskedLM
    lm = cls.from_config(bb.model.config).eval()
    with torch.no_grad():
        ref = lm(**enc).logits
    ours = bb.lm_logits(states[-1].hidden)
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-4, rtol=1e-4)


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
