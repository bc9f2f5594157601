"""Layer-by-layer backbones. Add a family: subclass LayerwiseBackbone, register it in loading.FAMILIES."""

from raee.backbones.base import LayerState, LayerwiseBackbone
from raee.backbones.decoder import GPT2Backbone, LlamaBackbone
from raee.backbones.encoder import EncoderBackbone
from raee.backbones.gemma import GemmaBackbone
from raee.backbones.loading import FAMILIES, OFFLINE_MODELS, PACKAGED_GGUF, load_backbone, resolve_model_source

__all__ = ["LayerState", "LayerwiseBackbone", "EncoderBackbone", "GPT2Backbone", "LlamaBackbone",
           "GemmaBackbone", "FAMILIES", "OFFLINE_MODELS", "PACKAGED_GGUF", "load_backbone", "resolve_model_source"]
