"""Generation fine-tunes, made once per content and reloaded afterwards; the entry points the generation
strategies and runs call (:func:`finetune_lm`).

A fine-tune's cache entry ``<cache_dir>/generation_finetune/<key>`` is keyed by everything that shapes the
weights: the settings (:class:`GenerationFinetune`: the loss and the shared ``finetune`` budget), the token
exits of a HashEE fine-tune (its strategy's settings), the backbone, the weights it started from (a
fine-tune already in the backbone is never applied twice), and the training pairs themselves
(a digest of their token ids, so a change of prompt, source length, tokenizer or split is a new entry). It is
built once under a file lock and renamed into place (:func:`raee.cache.load_or_build`): parallel jobs of a
sweep train it once, a killed fine-tune leaves nothing that loads, and a damaged entry is rebuilt with a
warning (or refused, with its error, when the user named the directory). Weights are safetensors.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from raee.atomic import atomic_write_text
from raee.backbones.base import LayerwiseBackbone
from raee.cache import load_or_build
from raee.errors import MissingFileError, UserError
from raee.generation.trainer import (LOSSES, ExitForward, FinetuneStats, Pair, TokenExitFn,
                                     check_finetune_settings, finetune_generation)
from raee.weights import check_state, save_state

#: attribute set on a backbone whose weights a fine-tune loaded: that fine-tune's key (None = as loaded)
WEIGHTS_ORIGIN = "weights_origin"
#: attribute holding the fine-tune in place: (its key, the origin it started from, its result)
IN_PLACE = "_raee_finetune"

#: the entries' sub-directory of the cache
CACHE_SUBDIR = "generation_finetune"


@dataclass(frozen=True)
class GenerationFinetune:
    """One fine-tune's settings: the loss and the shared ``finetune`` budget (conf/config.yaml).

    loss: "last", "joint" (CALM) or "token_exits" (HashEE; see :mod:`raee.generation.trainer`).
    batch_size: examples per optimiser step.
    """

    loss: str = "last"
    max_epochs: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup: float = 0.1
    gradient_clip_val: float | None = 1.0
    batch_size: int = 8
    max_steps: int = -1
    seed: int = 42

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise UserError(f"fine-tuning loss {self.loss!r} is unknown: choose one of {list(LOSSES)}")

    @classmethod
    def from_settings(cls, loss: str, settings: Mapping[str, Any], batch_size: int = 8) -> GenerationFinetune:
        """The fields of ``settings`` (a strategy's budget: max_epochs, lr, warmup, weight_decay, seed, max_steps,
        gradient_clip_val, batch_size; others are ignored here) with ``batch_size`` as the default batch size."""
        known = {k: settings[k] for k in ("max_epochs", "lr", "weight_decay", "warmup", "gradient_clip_val",
                                          "batch_size", "max_steps", "seed") if settings.get(k) is not None}
        known.setdefault("batch_size", int(batch_size))
        return cls(loss=loss, **known)

    def settings(self) -> dict[str, Any]:
        """What enters the cache key."""
        return asdict(self)

    def budget(self, stats: FinetuneStats | None) -> dict[str, Any]:
        """The budget line of a run's summary (the fields every fine-tuned method reports)."""
        return {"by": f"generation fine-tune ({self.loss} loss)", "epochs": self.max_epochs,
                "steps": stats.steps if stats else 0, "lr": self.lr, "head_lr": self.lr, "warmup": self.warmup,
                "weight_decay": self.weight_decay, "seed": self.seed, "batch_size": self.batch_size,
                "examples": stats.examples if stats else 0,
                "seconds": round(stats.seconds, 1) if stats else None}


@dataclass
class FinetuneResult:
    """A fine-tune in place in the backbone: where it is cached and what it did."""

    directory: Path
    key: str
    loaded: bool  # True: reloaded from the cache; False: trained now
    stats: FinetuneStats
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def pairs_digest(pairs: Sequence[Pair]) -> str:
    """sha256 of the training pairs' token ids (order included)."""
    h = hashlib.sha256()
    for prompt, target in pairs:
        h.update(json.dumps([list(map(int, prompt)), list(map(int, target))]).encode())
        h.update(b"\n")
    return h.hexdigest()


def finetune_key(backbone: LayerwiseBackbone, pairs: Sequence[Pair], settings: GenerationFinetune,
                 exits: dict[str, Any] | None = None, start: str | None | bool = False) -> str:
    """The content key of a fine-tune (see the module docstring). start: the key of the weights it starts from
    (default: those the backbone holds now)."""
    from raee.experiment import fingerprint

    if start is False:
        start = getattr(backbone, WEIGHTS_ORIGIN, None)
    return fingerprint({"method": "generation_finetune", "settings": settings.settings(), "exits": exits,
                        "backbone": backbone.describe(), "start": start,
                        "data": {"examples": len(pairs), "digest": pairs_digest(pairs)}})


def _lm_head_tied(backbone: LayerwiseBackbone) -> bool:
    weight = getattr(backbone.lm_head, "weight", None)
    return weight is not None and weight is backbone.model.get_input_embeddings().weight


def save_finetune(directory: Path, backbone: LayerwiseBackbone, settings: GenerationFinetune, stats: FinetuneStats,
                  key: str, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Weights (safetensors: the model, the LM head when it is not tied to the embeddings, ``extra``) and meta.json."""
    directory.mkdir(parents=True, exist_ok=True)
    save_state(directory / "model.safetensors", backbone.model.state_dict())
    if backbone.lm_head is not None and not _lm_head_tied(backbone):
        save_state(directory / "lm_head.safetensors", backbone.lm_head.state_dict())
    if extra:
        save_state(directory / "extra.safetensors", extra)
    meta = {"method": "generation_finetune", "key": key, "settings": settings.settings(), "backbone": backbone.name,
            "num_layers": backbone.num_layers,
            "vocab_size": int(backbone.model.get_input_embeddings().weight.shape[0]),
            "stats": asdict(stats) | {"examples_per_s": stats.examples_per_s}}
    atomic_write_text(directory / "meta.json", json.dumps(meta, indent=2))


def load_finetune(directory: Path, backbone: LayerwiseBackbone, settings: GenerationFinetune) -> FinetuneResult:
    """Load a saved fine-tune into ``backbone``; everything is read and checked before the model changes."""
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        raise MissingFileError(f"no generation fine-tune at {directory} (meta.json missing): point the checkpoint "
                               "at a directory a finished fine-tune wrote, or leave it unset to train one")
    meta = json.loads(meta_path.read_text())
    vocab_size = int(backbone.model.get_input_embeddings().weight.shape[0])
    problems = []
    if meta["num_layers"] != backbone.num_layers:
        problems.append(f"{meta['num_layers']} layers (backbone has {backbone.num_layers})")
    if meta["vocab_size"] != vocab_size:
        problems.append(f"a vocabulary of {meta['vocab_size']} (backbone has {vocab_size})")
    if meta["settings"].get("loss") != settings.loss:
        problems.append(f"the {meta['settings'].get('loss')} loss (asked for {settings.loss})")
    if problems:
        raise UserError(f"generation fine-tune {directory} was made for " + ", ".join(problems)
                        + ": point the checkpoint elsewhere (or delete it) to train a matching one")
    device = str(backbone.device)
    weights = load_file(str(directory / "model.safetensors"), device=device)
    check_state(backbone.model.state_dict(), weights, directory / "model.safetensors")
    head_file = directory / "lm_head.safetensors"
    head = None
    if backbone.lm_head is not None and not _lm_head_tied(backbone):
        if not head_file.exists():
            raise MissingFileError(f"{head_file} is missing: the backbone's LM head is not tied to its embeddings")
        head = load_file(str(head_file), device=device)
        check_state(backbone.lm_head.state_dict(), head, head_file)
    extra_file = directory / "extra.safetensors"
    extra = load_file(str(extra_file)) if extra_file.exists() else {}
    backbone.model.load_state_dict(weights)
    if head is not None:
        backbone.lm_head.load_state_dict(head)
    backbone.requires_grad_(False)
    backbone.eval()
    stats = meta["stats"]
    return FinetuneResult(directory=directory, key=meta["key"], loaded=True, extra=extra,
                          stats=FinetuneStats(steps=stats["steps"], examples=stats["examples"],
                                              seconds=stats["seconds"], final_loss=stats["final_loss"],
                                              layer_losses=stats.get("layer_losses")))


def cached_finetune(backbone: LayerwiseBackbone, pairs: Sequence[Pair], settings: GenerationFinetune, *,
                    token_exits: TokenExitFn | None = None, exits: dict[str, Any] | None = None,
                    extra: dict[str, torch.Tensor] | None = None, exit_forward: ExitForward | None = None,
                    cache_dir: str | Path | None = "artifacts/cache", checkpoint: str | Path | None = None,
                    progress: bool = True) -> FinetuneResult:
    """Fine-tune ``backbone`` on ``pairs`` once per content, reloading the saved weights on later calls.

    token_exits: loss="token_exits" only; exits: a JSON-able description of them for the key (HashEE's hash
    settings); extra: tensors saved beside the weights and handed back on reload (a HashEE token map).
    checkpoint: a directory the user names (refused when damaged) instead of the content-keyed cache entry.
    Afterwards the backbone holds the fine-tuned weights, frozen and in eval mode, and remembers the entry's
    key (:data:`WEIGHTS_ORIGIN`), so that a fine-tune started from these weights gets a key of its own. Asking
    for the fine-tune that is already in place (same content, same start) returns it without touching the weights.
    """
    check_finetune_settings(settings.loss, token_exits, settings.max_epochs, settings.lr, settings.warmup,
                            settings.batch_size)
    in_place = getattr(backbone, IN_PLACE, None)
    if in_place is not None and getattr(backbone, WEIGHTS_ORIGIN, None) == in_place[0]:
        key_then = finetune_key(backbone, pairs, settings, exits, start=in_place[1])
        if key_then == in_place[0]:
            return in_place[2]
    start = getattr(backbone, WEIGHTS_ORIGIN, None)
    key = finetune_key(backbone, pairs, settings, exits)
    directory = Path(checkpoint) if checkpoint else Path(cache_dir or "artifacts/cache") / CACHE_SUBDIR / key
    trained: list[FinetuneStats] = []

    def build(tmp: Path) -> None:
        stats = finetune_generation(
            backbone, pairs, loss=settings.loss, token_exits=token_exits, exit_forward=exit_forward,
            batch_size=settings.batch_size, max_epochs=settings.max_epochs, lr=settings.lr,
            weight_decay=settings.weight_decay, warmup=settings.warmup,
            gradient_clip_val=settings.gradient_clip_val, max_steps=settings.max_steps, seed=settings.seed,
            progress=progress)
        trained.append(stats)
        save_finetune(tmp, backbone, settings, stats, key, extra)

    result = load_or_build(directory, build, lambda d: load_finetune(d, backbone, settings),
                           auto=not checkpoint, what="generation fine-tune")
    result.loaded = not trained
    setattr(backbone, WEIGHTS_ORIGIN, result.key)
    setattr(backbone, IN_PLACE, (result.key, start, result))
    return result


def training_pairs(head: Any, datamodule: Any) -> list[Pair]:
    """(prompt ids, target ids + end id) of every training example, encoded by the bound ``head=lm``
    (:class:`raee.generation.prompts.LMHead`) exactly as the decoding loop will see them."""
    train = datamodule.split("train")
    targets = getattr(train, "targets", None)
    if targets is None:
        raise UserError("a generation fine-tune needs (source, target) pairs: set data.task_type=generation and "
                        "data.target_column (data=bbcnews_headlines has both)")
    pairs = []
    for source, target in zip(train.texts, targets):
        ids, prompt_len = head.encode_example(source, target)
        pairs.append((ids[:prompt_len], ids[prompt_len:]))
    return pairs


def finetune_lm(backbone: LayerwiseBackbone, head: Any, datamodule: Any, *, loss: str,
                token_exits: TokenExitFn | None = None, settings: Mapping[str, Any],
                cache_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Fine-tune ``backbone`` (and its LM head) on the data module's training pairs, once per content, and leave
    the fine-tuned weights in it. What the generation strategies' ``fit()`` and a run's shared fine-tune call.

    loss: "last", "joint" or "token_exits" (then ``token_exits`` gives every token's exit layer);
    settings: the budget (max_epochs, lr, warmup, weight_decay, seed, max_steps, gradient_clip_val, batch_size:
    default the data module's) and, for token exits, whatever else decides them (a HashEE strategy's settings:
    they key the cache too); ``settings["checkpoint"]``: a directory to save to / reload from instead of the cache.
    Returns the budget record a run's summary reports (``by, epochs, steps, lr, head_lr, warmup, weight_decay,
    seed, batch_size, examples, seconds``, plus ``cache``: the entry's directory, ``loaded``: reused or trained now).
    """
    budget = GenerationFinetune.from_settings(loss, settings, getattr(datamodule, "batch_size", 8) or 8)
    pairs = training_pairs(head, datamodule)
    exits = ({k: v for k, v in settings.items() if k != "checkpoint"} if loss == "token_exits" else None)
    result = cached_finetune(backbone, pairs, budget, token_exits=token_exits, exits=exits, cache_dir=cache_dir,
                             checkpoint=settings.get("checkpoint"), progress=progress)
    return budget.budget(result.stats) | {"cache": str(result.directory), "loaded": result.loaded}
