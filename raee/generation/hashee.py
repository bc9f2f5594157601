"""HashEE on a decoder: every token's exit layer comes from a hash of its id (``exit=hashee`` on a generation task).

The adaptation to a causal LM (the paper's generation setting used BART; its public code has none):

- a position's exit layer is the hash layer of the token *at* that position (its input id), prompt and generated
  alike; the position is updated by layers 1..e and its state copied above, where later tokens attend to keys and
  values of the copy (the decoding loop's state propagation);
- the next token is read at the position's exit layer: a generated token's exit layer is its input token's hash
  layer (the next token is not known before it is predicted, so it cannot be hashed);
- special tokens (chat-template markers, <bos>, end tokens) run all L layers, as [CLS] does in classification;
- ``exit.tokens=prompt``: only prompt tokens whose output is not read are hashed; the last prompt token and every
  generated token run all L layers (the saving is then in the prefill only);
- the model is fine-tuned with the same exits in place (teacher forcing through
  :func:`raee.generation.step.forward_with_exits`); ``exit.hash=none`` is the same fine-tune without exits.

Hashes: ``random`` (per type, seeded), ``frequency`` (training prompts and targets counted; unseen types run all L
layers), ``cluster`` (k-means on the input embeddings), ``none``. The mutual-information hash needs class labels
and the per-occurrence hash a fixed input, so neither applies to generation.
"""

from __future__ import annotations

from typing import Any

import torch

from raee.errors import UserError
from raee.generation import finetuning
from raee.generation.strategies import CONVERTERS, GenerationExit
from raee.hashee import hashing
from raee.hashee.strategy import HashEEExit

GENERATION_HASHES = ("random", "frequency", "cluster", "none")
TOKEN_MODES = ("all", "prompt")


class HashEEGeneration(GenerationExit):
    """Token exits by hash on a decoder (see the module docstring). ``settings`` is the ``exit=hashee`` object
    (:class:`~raee.hashee.strategy.HashEEExit`), whose hash, layers, seed and fine-tuning budget it uses."""

    name = "hashee"
    #: fine-tunes its own copy with its exits in place, from the backbone's starting weights (no shared fine-tune)
    own_finetune = True

    def __init__(self, settings: HashEEExit) -> None:
        super().__init__()
        if settings.hash not in GENERATION_HASHES:
            why = ("needs class labels" if settings.hash == "mi" else "hashes a fixed input, which decoding extends")
            raise UserError(f"exit.hash={settings.hash} {why}: on a generation task use one of "
                            f"{list(GENERATION_HASHES)}")
        if settings.tokens not in TOKEN_MODES:
            raise UserError(f"exit.tokens={settings.tokens!r}: use all (prompt and generated tokens exit by hash) or "
                            "prompt (only the prompt tokens whose output is not read)")
        self.settings = settings
        self.token_to_layer: torch.Tensor | None = None  # (V,) long, 1..L
        self._device_map: torch.Tensor | None = None
        self.trained: dict[str, Any] | None = None

    @property
    def hash(self) -> str:
        return self.settings.hash

    @property
    def tokens(self) -> str:
        return self.settings.tokens

    def validate(self, num_layers: int) -> None:
        self.settings.validate(num_layers)

    def knobs(self) -> dict[str, Any]:
        return {**self.settings.knobs(), "tokens": self.tokens}

    def training_settings(self) -> dict[str, Any]:
        """Everything that decides the fine-tuned weights (the trainer's cache key)."""
        return {"method": "hashee", **self.settings.training_settings(), "tokens": self.tokens}

    def budget(self) -> dict[str, Any] | None:
        return self.trained

    # ------------------------------------------------------------------ the hash
    def build_token_map(self, backbone: Any, head: Any, datamodule: Any = None) -> torch.Tensor:
        """(V,) exit layer per token id: the hash cuts the types into first_layer..last_layer; special tokens (and,
        for the frequency hash, types unseen in training) run all L layers."""
        L = backbone.num_layers
        self.settings.validate(L)
        embeddings = backbone.model.get_input_embeddings().weight
        vocab = int(embeddings.shape[0])
        if self.hash == "none":
            return torch.full((vocab,), L, dtype=torch.long)
        first, last = self.settings.first_layer, self.settings._last(L)
        buckets = last - first + 1
        special = [int(i) for i in backbone.tokenizer.all_special_ids]
        seen = None
        if self.hash == "random":
            layers = hashing.random_hash(vocab, buckets, self.settings.seed, special)
        elif self.hash == "cluster":
            layers = hashing.cluster_hash(embeddings.detach().cpu(), buckets, self.settings.seed, special,
                                          iterations=self.settings.kmeans_iterations)
        else:  # frequency: the training prompts and targets as the model reads them
            if datamodule is None:
                raise UserError("the frequency hash counts the training split's tokens: give the data module")
            counts = torch.zeros(vocab, dtype=torch.long)
            train = datamodule.split("train")
            for source, target in zip(train.texts, train.targets):
                ids, _ = head.encode_example(source, target)
                counts += torch.bincount(torch.tensor(ids), minlength=vocab)[:vocab]
            layers = hashing.frequency_hash(counts, buckets, special)
            seen = counts > 0
        layers = layers + (first - 1)
        layers[torch.tensor(special, dtype=torch.long)] = L
        if seen is not None:
            layers[~seen] = L
        return layers

    def use_token_map(self, token_to_layer: torch.Tensor) -> None:
        """Set the (V,) token -> exit layer map directly (tests, notebooks)."""
        token_to_layer = torch.as_tensor(token_to_layer).long().cpu()
        if token_to_layer.dim() != 1 or int(token_to_layer.min()) < 0:
            raise UserError("token_to_layer must be a (vocab_size,) tensor of exit layers >= 0")
        self.token_to_layer = token_to_layer
        self._device_map = None

    def token_exits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, reads: torch.Tensor
                    ) -> torch.Tensor:
        """(B, T) exit layer of every token: its hash layer; with ``tokens=prompt`` the read positions (B, T) run all
        L layers. The same function plans decoding steps and teacher-forced training (the trainer's token_exits)."""
        if self.token_to_layer is None:
            raise RuntimeError("HashEE has no token map yet: call fit() (run_experiment does) or use_token_map()")
        if self._device_map is None or self._device_map.device != input_ids.device:
            self._device_map = self.token_to_layer.to(input_ids.device)
        layers = self._device_map[input_ids]
        if self.tokens == "prompt":
            layers = torch.where(reads.to(layers.device), torch.full_like(layers, self.num_layers), layers)
        return layers

    def plan(self, input_ids: torch.Tensor, reads: torch.Tensor) -> torch.Tensor:
        return self.token_exits(input_ids, None, reads)

    # ------------------------------------------------------------------ fit
    def prepare(self, backbone: Any, head: Any) -> None:
        super().prepare(backbone, head)
        if self.token_to_layer is None:
            if self.hash == "frequency":
                raise RuntimeError("the frequency hash is built from the training split: call fit() first")
            self.use_token_map(self.build_token_map(backbone, head))
        vocab = int(backbone.model.get_input_embeddings().weight.shape[0])
        if self.token_to_layer.numel() != vocab:
            raise UserError(f"the token map covers {self.token_to_layer.numel()} ids but the backbone's vocabulary has "
                            f"{vocab}: build it again with fit() on this backbone")

    def fit(self, backbone: Any, head: Any, datamodule: Any, cache_dir: Any = None, progress: bool = True) -> None:
        """Build the hash, then fine-tune with the exits in place (the shared budget; exit.max_epochs=0: no
        fine-tune, the backbone as loaded)."""
        self.num_layers = backbone.num_layers
        self.use_token_map(self.build_token_map(backbone, head, datamodule))
        s = self.settings
        if s.max_epochs > 0 and s.max_steps != 0:
            self.trained = finetuning.finetune(
                "hashee", backbone, head, datamodule, loss="token_exits", token_exits=self.token_exits,
                settings=self.training_settings(), cache_dir=cache_dir, progress=progress)


def _from_hashee(settings: HashEEExit) -> HashEEGeneration:
    return HashEEGeneration(settings)


CONVERTERS["HashEEExit"] = _from_hashee  # exit=hashee on a generation task
