"""The packaged real causal LMs (SmolLM2-135M, Gemma-3-270M) run layer by layer exactly like Hugging Face.

Skipped, with the reason, when the packaged GGUF file has not been fetched on this machine (tests
never download). SmolLM2 runs by default (``real_model``: ~30 s the first time, which converts the
GGUF once into the per-user cache, a few seconds after); the Gemma-3 checks and the comparison with
transformers' own GGUF loader take minutes and are opt-in (``real_lm``: ``pytest --real-lm``).

How the last layer is compared: Hugging Face replaces its last ``hidden_states`` entry by the
final-normed output, so layer L is compared as ``final_norm(ours)`` against it, and our raw layer-L
output against the last decoder layer's own output (caught with a forward hook).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from raee.assets import GEMMA3_270M_GGUF, SMOLLM2_GGUF, PackagedAsset, cache_home
from raee.backbones import load_backbone, resolve_model_source
from tests.conftest import assert_layers_match_hf

#: short and long inputs of different lengths, so the batch is right-padded
SNIPPETS = [
    "A gorgeous, witty, seductive movie.",
    "The film is strictly routine.",
    "Review: an utterly boring, lifeless film that never finds its footing, despite a cast that "
    "deserved far better material and a director who once knew how to pace a thriller.",
    "Funny and touching.",
    "It's a mess, but a glorious one, full of ideas and energy.",
]


def _fetched(asset: PackagedAsset) -> Path | None:
    """The asset's file if it is already on this machine (fetched or placed by hand), else None."""
    manual = os.environ.get("RAEE_ASSETS")
    candidates = ([Path(manual).expanduser() / asset.name / asset.filename] if manual else []) + [
        cache_home() / "assets" / asset.name / asset.filename]
    return next((path for path in candidates if path.is_file()), None)


def _backbone_or_skip(asset: PackagedAsset, name: str):
    if _fetched(asset) is None:
        packages = ", ".join(sorted({p.package for p in asset.parts}))
        pytest.skip(f"{asset.filename} is not on this machine (tests never download it): any run with "
                    f"backbone={name} fetches it from the package(s) {packages}")
    return load_backbone(name)


@pytest.fixture(scope="module")
def smollm2():
    return _backbone_or_skip(SMOLLM2_GGUF, "smollm2")


@pytest.fixture(scope="module")
def gemma3():
    return _backbone_or_skip(GEMMA3_270M_GGUF, "gemma3_270m")


@pytest.mark.real_lm
@pytest.mark.parametrize("asset,name", [(SMOLLM2_GGUF, "smollm2"), (GEMMA3_270M_GGUF, "gemma3_270m")])
def test_cached_float_copy_equals_transformers_reading_the_gguf(asset, name):
    """The cached save_pretrained copy holds the very weights and tokenizer transformers reads from the GGUF.

    First in this file, before the module's backbones are loaded: Gemma's direct load alone takes ~2.7 GB.
    """
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = _fetched(asset)
    if gguf_file is None:
        pytest.skip(f"{asset.filename} is not on this machine (tests never download it)")
    converted = Path(resolve_model_source(name))
    cached_tok, direct_tok = (AutoTokenizer.from_pretrained(converted),
                              AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name))
    for text in SNIPPETS + ["héllo wörld 123 <b>", "  two  spaces\n"]:
        assert cached_tok(text)["input_ids"] == direct_tok(text)["input_ids"]
    direct = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    expected = direct.state_dict()
    with safe_open(str(converted / "model.safetensors"), "pt") as saved:  # read lazily: one copy in memory
        keys = set(saved.keys())
        assert {k for k in expected if k != "lm_head.weight"} <= keys  # the tied head is saved once
        for key in keys:
            assert torch.equal(saved.get_tensor(key), expected[key]), key


def _assert_layers_equal_hf(bb, atol: float = 1e-4) -> None:
    enc = bb.tokenize(SNIPPETS)
    assert (enc["attention_mask"] == 0).any(), "the batch must be padded"
    assert bb.tokenizer.padding_side == "right"
    states = bb.all_layers(**enc)
    raw_last = []
    hook = bb.layer_modules()[-1].register_forward_hook(lambda module, args, out: raw_last.append(out))
    try:
        with torch.no_grad():
            ref = bb.model(**enc, output_hidden_states=True).hidden_states
    finally:
        hook.remove()
    assert_layers_match_hf(bb, states, ref, enc["attention_mask"], atol=atol)
    real = enc["attention_mask"].bool()
    last = raw_last[0][0] if isinstance(raw_last[0], tuple) else raw_last[0]
    torch.testing.assert_close(states[-1].hidden[real], last[real], atol=atol, rtol=1e-5)


def _assert_survivors_equal_a_run_alone(bb, exit_after: int, atol: float = 1e-4) -> None:
    """Examples leave after layer ``exit_after``; the others' later layers equal a batch without them.

    Not bit-exact in general: the first layers ran at another batch shape, so float sums run in
    another order. Gemma's residual stream reaches ~1e5, where that rounding noise is ~1e-3 even
    between two plain HF forward passes of different batches; hence an absolute tolerance that
    grows with the layer's largest value (1e-6 of it). SmolLM2 comes out bit-exact.
    """
    keep = torch.tensor([True, False, False, True, True])  # the longest snippet leaves: padding is trimmed
    enc = bb.tokenize(SNIPPETS)
    state = bb.embed(**enc)
    for _ in range(exit_after):
        state = bb.run_layer(state)
    state = bb.select(state, keep)
    alone = bb.tokenize([s for s, k in zip(SNIPPETS, keep) if k])
    assert state.hidden.shape[1] == alone["input_ids"].shape[1] < enc["input_ids"].shape[1]
    ref = bb.all_layers(**alone)
    real = alone["attention_mask"].bool()
    for layer in range(exit_after + 1, bb.num_layers + 1):
        state = bb.run_layer(state)
        expected = ref[layer].hidden[real]
        torch.testing.assert_close(state.hidden[real], expected, atol=atol + 1e-6 * float(expected.abs().max()),
                                   rtol=1e-4)


@pytest.mark.real_model
def test_smollm2_is_a_30_layer_llama_with_a_tied_head(smollm2):
    cfg = smollm2.config
    assert type(smollm2).__name__ == "LlamaBackbone" and smollm2.num_layers == 30
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (576, 9, 3)  # GQA
    assert smollm2.lm_head.weight.data_ptr() == smollm2.model.embed_tokens.weight.data_ptr()
    assert smollm2.tokenizer.pad_token is not None
    # SmolLM2's tokenizer adds no BOS token (as on the hub)
    assert smollm2.tokenizer("Funny.")["input_ids"][0] != smollm2.tokenizer.bos_token_id


@pytest.mark.real_model
def test_smollm2_layers_equal_hugging_face_hidden_states(smollm2):
    _assert_layers_equal_hf(smollm2)


@pytest.mark.real_model
def test_smollm2_survivors_after_exits_equal_a_run_without_the_others(smollm2):
    _assert_survivors_equal_a_run_alone(smollm2, exit_after=10)


@pytest.mark.real_lm
def test_gemma3_270m_layers_equal_hugging_face_hidden_states(gemma3):
    assert type(gemma3).__name__ == "GemmaBackbone" and gemma3.num_layers == 18
    assert gemma3.layer_types.count("full_attention") == 3
    assert gemma3.lm_head.weight.data_ptr() == gemma3.model.embed_tokens.weight.data_ptr()
    ids = gemma3.tokenizer("Funny.")["input_ids"]
    assert ids[0] == gemma3.tokenizer.bos_token_id  # Gemma expects <bos>; its tokenizer adds it
    _assert_layers_equal_hf(gemma3)
    _assert_survivors_equal_a_run_alone(gemma3, exit_after=6)
