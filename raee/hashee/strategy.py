"""HashEE (Sun et al. 2022): token-level early exit with hash-assigned exit layers.

Every token gets a fixed exit layer from a hash (random per type or per occurrence, frequency,
mutual information or embedding clusters); a token is updated by layers 1..e and frozen after
its exit layer e, while tokens still active keep attending to it. Special tokens get L, so the
classification token runs every layer and the prediction is read from the head's layer-L
classifier. The backbone and that classifier are fine-tuned together with the exits in place
(:mod:`raee.hashee.training`), from the backbone's starting weights: HashEE trains its own
classifier, so the head is only bound, never fitted, before :meth:`HashEEExit.fit`. There are no
internal classifiers and no instance-level decisions: every example "exits" at L; the savings are
inside the layers and are reported by :meth:`HashEEExit.flops_speedup`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from raee.backbones.base import LayerState, LayerwiseBackbone
from raee.cache import load_or_build
from raee.errors import MissingFileError, UserError
from raee.exits.base import BatchContext, PlannedExit
from raee.exits.simple import FullModel
from raee.hashee import hashing
from raee.hashee.token_layer import active_tokens, layer_parts, run_token_exit_layer, token_exit_flops
from raee.weights import check_state as _check_state

#: the hashes HashEEExit accepts: the paper's, and ``none`` (no token exits: the same fine-tuning
#: recipe without exits, the reference HashEE is compared with)
STRATEGY_HASHES = (*hashing.HASHES, "none")


def _parse_last_layer(value: int | float | None) -> int | float | None:
    """exit.last_layer as given: None (= L), a layer number (int >= 1) or a fraction of L (float in (0, 1))."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"exit.last_layer={value!r} must be a layer number (e.g. 4), a fraction of the backbone's "
                        "L in (0, 1) (e.g. 0.67 = 4 of 6 layers) or null (= L)")
    if isinstance(value, float) and 0.0 < value < 1.0:
        return value
    if float(value).is_integer() and value >= 1:
        return int(value)
    raise UserError(f"exit.last_layer={value!r} is neither a layer number >= 1 nor a fraction of L in (0, 1): give "
                    "e.g. 4 (a layer) or 0.67 (4 of 6 layers, 8 of 12), or null (= L)")


class HashEEExit(PlannedExit):
    name = "hashee"
    supports_regression = True
    trains_head = True  # fine-tunes the layer-L classifier itself: the head is bound, not fitted, before fit()

    def __init__(self, hash: str = "random", num_layers: int | None = None, first_layer: int = 1,
                 last_layer: int | float | None = 0.67, seed: int = 42,
                 max_epochs: int = 1, lr: float = 2e-5, head_lr: float | None = None, weight_decay: float = 0.01,
                 warmup: float = 0.1, gradient_clip_val: float | None = 1.0,
                 limit_train_batches: int | float | None = None, max_steps: int = -1,
                 kmeans_iterations: int = 10, checkpoint: str | None = None, tokens: str = "all") -> None:
        if hash not in STRATEGY_HASHES:
            raise UserError(f"exit.hash={hash!r} is not a HashEE hash: choose one of {list(STRATEGY_HASHES)}")
        if lr <= 0 or (head_lr is not None and head_lr <= 0):
            raise UserError(f"exit.lr={lr} and exit.head_lr={head_lr} must be positive learning rates")
        if max_epochs < 0:
            raise UserError(f"exit.max_epochs={max_epochs} must be >= 0 (0 = hash only, no fine-tuning)")
        if not 0.0 <= warmup < 1.0:
            raise UserError(f"exit.warmup={warmup} is the warm-up share of the training steps: give 0 <= warmup < 1")
        if int(first_layer) < 1:
            raise UserError(f"exit.first_layer={first_layer} must be >= 1: a token is updated by at least layer 1")
        self.hash = hash
        self.num_layers = None if num_layers is None else int(num_layers)
        self.first_layer = int(first_layer)
        self.last_layer_setting = _parse_last_layer(last_layer)
        # the layer itself: set now for a layer number, by validate() (which knows L) for a fraction of L
        self.last_layer = self.last_layer_setting if isinstance(self.last_layer_setting, int) else None
        if self.last_layer is not None and self.last_layer < self.first_layer:
            raise UserError(f"exit.last_layer={last_layer} is below exit.first_layer={first_layer}: tokens exit in "
                            "first_layer..last_layer; give last_layer >= first_layer (null = the backbone's L)")
        self.seed = int(seed)
        self.max_epochs, self.lr, self.head_lr = int(max_epochs), float(lr), head_lr
        self.weight_decay, self.warmup, self.gradient_clip_val = float(weight_decay), float(warmup), gradient_clip_val
        self.limit_train_batches, self.max_steps = limit_train_batches, int(max_steps)
        self.kmeans_iterations = int(kmeans_iterations)
        self.checkpoint = checkpoint
        self.tokens = tokens  # generation tasks only (raee.generation.hashee): which tokens are hashed
        self.plan_layer = 0
        self.token_to_layer: torch.Tensor | None = None  # (V,) long, 1..L (type hashes); None per occurrence
        self.special_ids: list[int] = []  # never exit early (per-occurrence hash)
        self._layers = self.num_layers or 0  # L, known from the backbone at fit/prepare
        self.ready = False  # True once the exit assignment is known (fit, load or use_token_map)
        self.checkpoint_dir: Path | None = None  # where the last fit saved to / loaded from
        self.loaded = False  # True when the last fit reloaded a checkpoint instead of training
        self.train_steps = 0  # optimiser steps of the last fine-tune (also read back from a checkpoint)
        self._device_map: torch.Tensor | None = None
        self._exits_for: torch.Tensor | None = None  # the input_ids whose exit layers are in _exits
        self._exits: torch.Tensor | None = None
        self.reset_flops()

    # ------------------------------------------------------------------ settings
    def knobs(self) -> dict[str, Any]:
        last = self._last_layer_key()
        if last and isinstance(self.last_layer_setting, float):
            last["last_layer_fraction"] = self.last_layer_setting  # the setting beside the layer it resolved to
        return {"hash": self.hash, "first_layer": self.first_layer, **last, "seed": self.seed,
                "max_epochs": self.max_epochs, "lr": self.lr}

    def _last_layer_key(self) -> dict[str, Any]:
        # only when set: fine-tunes cached before the knob existed (last_layer = L) keep their cache keys; a
        # fraction of L enters as the layer it resolves to, so 0.67 on 6 layers shares last_layer=4's cache.
        # hash=none exits nothing, so the reference's key is the same for every last_layer
        if self.hash == "none" or self.last_layer_setting is None:
            return {}
        return {"last_layer": self.last_layer if self.last_layer is not None else self.last_layer_setting}

    def training_settings(self) -> dict[str, Any]:
        return {"hash": self.hash, "first_layer": self.first_layer, **self._last_layer_key(), "seed": self.seed,
                "max_epochs": self.max_epochs, "lr": self.lr, "head_lr": self.head_lr,
                "weight_decay": self.weight_decay, "warmup": self.warmup,
                "gradient_clip_val": self.gradient_clip_val, "limit_train_batches": self.limit_train_batches,
                "max_steps": self.max_steps, "kmeans_iterations": self.kmeans_iterations}

    def budget(self) -> dict[str, Any]:
        """The fine-tuning budget of the last fit (reported in summaries beside the other methods')."""
        return {"by": "hashee", "epochs": self.max_epochs, "steps": self.train_steps, "lr": self.lr,
                "head_lr": self.head_lr if self.head_lr is not None else self.lr, "warmup": self.warmup,
                "weight_decay": self.weight_decay, "seed": self.seed}

    def validate(self, num_layers: int) -> None:
        if self.num_layers is not None and self.num_layers != num_layers:
            raise UserError(
                f"exit.num_layers={self.num_layers} but the backbone has {num_layers} layers: HashEE hashes tokens "
                f"into the backbone's layers, so set exit.num_layers={num_layers} or null (use the backbone's)")
        if self.first_layer > num_layers:
            raise UserError(f"exit.first_layer={self.first_layer} is above the backbone's {num_layers} layers: use "
                            f"1..{num_layers} ({num_layers} = no token exits)")
        if isinstance(self.last_layer_setting, int) and self.last_layer_setting > num_layers:
            raise UserError(f"exit.last_layer={self.last_layer_setting} is above the backbone's {num_layers} layers: "
                            f"use {self.first_layer}..{num_layers}, a fraction of L in (0, 1), or null (= {num_layers})")
        if isinstance(self.last_layer_setting, float):
            self.last_layer = self._last(num_layers)

    def _last(self, num_layers: int) -> int:
        """The last layer a hashed token can exit at (special and unseen tokens run all ``num_layers``): the
        layer given, or a fraction of L rounded to the nearest layer and kept within first_layer..L."""
        setting = self.last_layer_setting
        if setting is None:
            return num_layers
        if isinstance(setting, float):
            return min(num_layers, max(self.first_layer, math.floor(setting * num_layers + 0.5)))
        return setting

    @staticmethod
    def _check_backbone(backbone: LayerwiseBackbone) -> None:
        if backbone.is_decoder:
            raise UserError(f"HashEE needs a bidirectional encoder backbone (BERT/RoBERTa/DistilBERT family); "
                            f"'{backbone.name}' is a causal decoder: choose an encoder backbone")
        layer_parts(backbone.layer_modules()[0])  # raises for unsupported layer types

    @staticmethod
    def _check_head(head: Any, num_layers: int) -> None:
        classifiers = getattr(head, "classifiers", None)
        if classifiers is None:
            raise UserError(f"HashEE needs head=linear (it fine-tunes the layer-{num_layers} linear classifier "
                            f"together with the backbone); {type(head).__name__} has no classifiers")
        if len(classifiers) != num_layers + 1:
            raise UserError(f"the linear head has {len(classifiers)} classifiers but the backbone has "
                            f"{num_layers} layers (L+1 = {num_layers + 1} expected): bind the head to this backbone")

    # ------------------------------------------------------------------ the hash
    def build_token_map(self, backbone: LayerwiseBackbone, head: Any, datamodule: Any,
                        progress: bool = True) -> torch.Tensor | None:
        """(V,) exit layer per token id in first_layer..last_layer, from the training split (or the embeddings /
        a seed): the hash cuts the tokens into last_layer - first_layer + 1 buckets; special tokens and, for the
        counting hashes, tokens unseen in training run all L layers. None for the per-occurrence hash, which has
        no map."""
        L = backbone.num_layers
        vocab_size = int(backbone.model.get_input_embeddings().weight.shape[0])
        if self.hash == "random_occurrence":
            return None
        if self.hash == "none":
            return torch.full((vocab_size,), L, dtype=torch.long)
        buckets, seen = self._hash_buckets(backbone, head, datamodule, progress)
        layers = buckets + (self.first_layer - 1)
        # as in the paper: special tokens and tokens unseen in training never exit early (the hashes put them in
        # the last bucket, which is layer L only when last_layer is L)
        layers[torch.tensor(backbone.tokenizer.all_special_ids, dtype=torch.long)] = L
        if seen is not None:
            layers[~seen] = L
        return layers

    def _hash_buckets(self, backbone: LayerwiseBackbone, head: Any, datamodule: Any, progress: bool
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """((V,) bucket 1..B of every token id, B = last_layer - first_layer + 1; (V,) bool types seen in training,
        or None for the hashes that count nothing)."""
        from raee.features import encode_batch

        buckets = self._last(backbone.num_layers) - self.first_layer + 1
        embeddings = backbone.model.get_input_embeddings().weight
        vocab_size = int(embeddings.shape[0])
        special = list(backbone.tokenizer.all_special_ids)
        if self.hash == "random":
            return hashing.random_hash(vocab_size, buckets, self.seed, special), None
        if self.hash == "cluster":
            return hashing.cluster_hash(embeddings.detach().cpu(), buckets, self.seed, special,
                                        iterations=self.kmeans_iterations), None
        counts = torch.zeros(vocab_size, dtype=torch.long)
        num_classes = len(datamodule.label_names)
        joint = torch.zeros(vocab_size, num_classes, dtype=torch.long)
        class_counts = torch.zeros(num_classes, dtype=torch.long)
        loader = datamodule.train_dataloader()
        for batch in tqdm(loader, desc="hashee: counting tokens", disable=not progress, leave=False):
            enc = encode_batch(backbone, head, batch)  # the texts exactly as the model reads them
            if self.hash == "frequency":
                hashing.add_token_counts(counts, enc["input_ids"], enc["attention_mask"])
            else:
                hashing.add_token_label_counts(joint, class_counts, enc["input_ids"], enc["attention_mask"],
                                               batch["label"])
        if self.hash == "frequency":
            return hashing.frequency_hash(counts, buckets, special), counts > 0
        return hashing.mutual_information_hash(joint, buckets, special, class_counts=class_counts), joint.sum(1) > 0

    def use_token_map(self, token_to_layer: torch.Tensor) -> None:
        """Set the (V,) token -> exit layer map directly (notebooks, tests)."""
        token_to_layer = torch.as_tensor(token_to_layer).long().cpu()
        if token_to_layer.dim() != 1 or token_to_layer.numel() == 0 or int(token_to_layer.min()) < 1:
            raise ValueError("token_to_layer must be a non-empty (vocab_size,) tensor of exit layers >= 1")
        self.token_to_layer = token_to_layer
        self._device_map = self._exits_for = None
        self.ready = True

    def use_occurrence_hash(self, special_ids: list[int]) -> None:
        """Assign layers per token occurrence (hash=random_occurrence); ``special_ids`` never exit early."""
        self.token_to_layer = None
        self._device_map = self._exits_for = None
        self.special_ids = [int(i) for i in special_ids]
        self.ready = True

    def assign(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) exit layer of every token of a batch (1..L; special tokens L)."""
        if not self.ready:
            raise RuntimeError("HashEE has no token exit assignment yet: call fit() (run_experiment does) or "
                               "use_token_map()")
        if self.token_to_layer is None:
            buckets = self._last(self._layers) - self.first_layer + 1
            layers = hashing.occurrence_random_layers(input_ids, attention_mask, buckets, self.seed,
                                                      self.special_ids) + (self.first_layer - 1)
            if self._last(self._layers) == self._layers:
                return layers  # special tokens and padding already got the last bucket, layer L
            special = torch.isin(input_ids, torch.tensor(self.special_ids, dtype=torch.long, device=input_ids.device))
            return torch.where(special | ~attention_mask.bool(), torch.full_like(layers, self._layers), layers)
        device = input_ids.device
        if self._device_map is None or self._device_map.device != device:
            self._device_map = self.token_to_layer.to(device)
        return self._device_map[input_ids]

    # ------------------------------------------------------------------ fit / checkpoint
    def default_checkpoint_dir(self, backbone: LayerwiseBackbone, head: Any, datamodule: Any,
                               cache_dir: Any) -> Path:
        from raee.experiment import data_description, fingerprint

        # of the head, only what shapes HashEE's classifier: its own settings train it, not the head's
        shape = {k: v for k, v in head.describe().items() if k in ("type", "pooling", "dropout", "task")}
        key = fingerprint({"method": "hashee", "settings": self.training_settings(),
                           "backbone": backbone.describe(), "head": shape, "data": data_description(datamodule)})
        return Path(cache_dir or "artifacts/cache") / "hashee" / key

    def fit(self, backbone: LayerwiseBackbone, head: Any, datamodule: Any, cache_dir: Any = None,
            progress: bool = True) -> None:
        """Build the hash and fine-tune backbone + layer-L classifier with token exits in place, once per
        setting (a build-once cache directory, safe under parallel jobs); later fits reload it."""
        L = backbone.num_layers
        self.validate(L)
        self._check_backbone(backbone)
        self._check_head(head, L)
        self._layers = L
        if getattr(datamodule, "is_regression", False) and self.hash == "mi":
            raise UserError("the mutual-information hash needs class labels, not regression targets: use "
                            "exit.hash=frequency, random, random_occurrence or cluster for regression data")
        directory = Path(self.checkpoint) if self.checkpoint else self.default_checkpoint_dir(
            backbone, head, datamodule, cache_dir)
        self.checkpoint_dir = directory
        self.loaded = True  # unless build() runs below

        def build(tmp: Path) -> None:
            self.loaded = False
            self._train(backbone, head, datamodule, progress)
            self.save(tmp, backbone, head)

        load_or_build(directory, build, lambda d: self.load(d, backbone, head), auto=not self.checkpoint,
                      what="HashEE checkpoint")

    def _train(self, backbone: LayerwiseBackbone, head: Any, datamodule: Any, progress: bool) -> None:
        token_to_layer = self.build_token_map(backbone, head, datamodule, progress=progress)
        if token_to_layer is None:
            self.use_occurrence_hash(backbone.tokenizer.all_special_ids)
        else:
            self.use_token_map(token_to_layer)
        self.train_steps = 0
        if self.max_epochs > 0 and self.max_steps != 0:
            from raee.hashee.training import finetune_with_token_exits

            self.train_steps = finetune_with_token_exits(
                backbone, head, self.assign, datamodule, max_epochs=self.max_epochs, lr=self.lr,
                head_lr=self.head_lr, weight_decay=self.weight_decay, warmup=self.warmup,
                gradient_clip_val=self.gradient_clip_val, limit_train_batches=self.limit_train_batches,
                max_steps=self.max_steps, seed=self.seed, progress=progress)

    def save(self, directory: str | Path, backbone: LayerwiseBackbone, head: Any) -> None:
        """Token map (type hashes), backbone weights and head classifiers as safetensors, and meta.json."""
        if not self.ready:
            raise RuntimeError("nothing to save: HashEE has no token exit assignment yet (call fit() first)")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"backbone.safetensors": backbone.model.state_dict(),
                   "classifiers.safetensors": head.classifiers.state_dict()}
        if self.token_to_layer is not None:
            tensors["token_to_layer.safetensors"] = {"token_to_layer": self.token_to_layer}
        for name, state in tensors.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(directory / name))
        L = backbone.num_layers
        meta = {"method": "hashee", "settings": self.training_settings(), "num_layers": L,
                "vocab_size": int(backbone.model.get_input_embeddings().weight.shape[0]),
                "backbone": backbone.name, "head": head.describe(), "label_names": list(head.label_names),
                "special_ids": list(backbone.tokenizer.all_special_ids), "train_steps": self.train_steps,
                "types_per_layer": (hashing.layer_histogram(self.token_to_layer, L)[1:]
                                    if self.token_to_layer is not None else None)}
        (directory / "meta.json").write_text(json.dumps(meta, indent=2))

    def load(self, directory: str | Path, backbone: LayerwiseBackbone, head: Any) -> None:
        """Restore a saved run into ``backbone`` and ``head``; everything is checked before anything is
        changed, so a refused checkpoint leaves the model as it was."""
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.exists():
            raise MissingFileError(f"no HashEE checkpoint at {directory} (meta.json missing): run fit() to train "
                                   "one, or point exit.checkpoint at a directory a finished run wrote")
        meta = json.loads(meta_path.read_text())
        L = backbone.num_layers
        vocab_size = int(backbone.model.get_input_embeddings().weight.shape[0])
        problems = []
        if meta["num_layers"] != L:
            problems.append(f"{meta['num_layers']} layers (backbone has {L})")
        if meta["vocab_size"] != vocab_size:
            problems.append(f"a vocabulary of {meta['vocab_size']} (backbone has {vocab_size})")
        if meta["label_names"] != list(head.label_names):
            problems.append(f"classes {meta['label_names']} (head has {list(head.label_names)})")
        if meta["settings"]["hash"] != self.hash:
            problems.append(f"hash={meta['settings']['hash']} (asked for {self.hash})")
        if problems:
            raise UserError(f"HashEE checkpoint {directory} was made for " + ", ".join(problems)
                            + ": point exit.checkpoint elsewhere (or delete it) to train a matching one")
        device = backbone.device
        weights = load_file(str(directory / "backbone.safetensors"), device=str(device))
        classifiers = load_file(str(directory / "classifiers.safetensors"), device=str(device))
        _check_state(backbone.model.state_dict(), weights, directory / "backbone.safetensors")
        _check_state(head.classifiers.state_dict(), classifiers, directory / "classifiers.safetensors")
        self._layers = L
        if meta["settings"]["hash"] == "random_occurrence":
            self.use_occurrence_hash(meta["special_ids"])
        else:
            self.use_token_map(load_file(str(directory / "token_to_layer.safetensors"))["token_to_layer"])
        self.train_steps = int(meta.get("train_steps", 0))
        backbone.model.load_state_dict(weights)
        head.classifiers.load_state_dict(classifiers)
        backbone.requires_grad_(False)
        backbone.model.eval()
        head.eval()

    # ------------------------------------------------------------------ inference
    def prepare(self, backbone: LayerwiseBackbone, head: Any) -> None:
        super().prepare(backbone, head)
        self._check_backbone(backbone)
        self._check_head(head, backbone.num_layers)
        if not self.ready:
            raise RuntimeError("HashEE has no token -> layer map: call fit() (run_experiment does) or use_token_map()")
        self._layers = backbone.num_layers
        vocab_size = int(backbone.model.get_input_embeddings().weight.shape[0])
        if self.token_to_layer is not None and self.token_to_layer.numel() != vocab_size:
            raise UserError(f"the token map covers {self.token_to_layer.numel()} ids but the backbone's vocabulary "
                            f"has {vocab_size}: rebuild it with fit() on this backbone")
        self.reset_flops()  # a test run begins: count its batches only

    def plan(self, state: LayerState, ctx: BatchContext) -> torch.Tensor:
        # the classification token never exits: every example is read at layer L
        return torch.full((state.batch_size,), ctx.num_layers, dtype=torch.long, device=state.hidden.device)

    def token_exits(self, state: LayerState) -> torch.Tensor:
        """(B, T) exit layer of every token of ``state``; computed once per batch (the layers of one batch
        share its input_ids tensor)."""
        if self._exits_for is not state.input_ids:
            self._exits_for, self._exits = state.input_ids, self.assign(state.input_ids, state.attention_mask)
        return self._exits

    def run_layer(self, backbone: LayerwiseBackbone, state: LayerState) -> LayerState:
        def token_level(layer: int, state: LayerState) -> torch.Tensor:
            token_exit = self.token_exits(state)
            parts = layer_parts(backbone.layer_modules()[layer - 1])
            active = active_tokens(state.attention_mask, token_exit, layer)
            self.flops += token_exit_flops(state.attention_mask, active, parts.hidden_size, parts.intermediate_size)
            self.full_flops += token_exit_flops(state.attention_mask, None, parts.hidden_size,
                                                parts.intermediate_size)
            return run_token_exit_layer(backbone, layer, state, token_exit)

        return backbone.run_layer(state, token_level)

    def wall_clock_reference(self) -> "TokenPathFullModel":
        """The full model to time HashEE against: the same token-level layer code with no token exiting.
        The transformers layer (FullModel) also computes padding positions, which HashEE's packed queries and
        feed-forward skip; timed against it, HashEE's speed-up would include that padding gain (1.6x on
        Rotten Tomatoes snippets at batch 32 with hash=none, which exits nothing). Unpadded batches run the
        transformers layer, the faster of the two there."""
        return TokenPathFullModel()

    # ------------------------------------------------------------------ FLOPs
    def reset_flops(self) -> None:
        """Forget the FLOPs counted so far (called when a test run begins)."""
        self.flops = 0
        self.full_flops = 0

    def flops_speedup(self) -> float | None:
        """Full-model FLOPs / HashEE FLOPs over the layers run since the last reset; None before any."""
        if self.flops == 0:
            return None
        return self.full_flops / self.flops


class TokenPathFullModel(FullModel):
    """Every token through every layer, computed by HashEE's token-level layer (queries and feed-forward for
    real tokens only, padding copied): the same predictions as :class:`FullModel`, and the reference HashEE's
    wall-clock speed-up is measured against, so that it counts the exits and nothing else. A batch without
    padding runs the model's own layer: there the packing skips nothing and only costs time (3-10% at batch
    1), which would flatter HashEE."""

    name = "full (token path)"

    def run_layer(self, backbone: LayerwiseBackbone, state: LayerState) -> LayerState:
        if bool(state.attention_mask.bool().all()):
            return backbone.run_layer(state)

        def every_token(layer: int, state: LayerState) -> torch.Tensor:
            return run_token_exit_layer(backbone, layer, state, torch.full_like(state.attention_mask, layer))

        return backbone.run_layer(state, every_token)

