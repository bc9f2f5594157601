"""Where the generation strategies' fine-tunes come from: the trainer of :mod:`raee.generation.finetune`.

The strategies (HashEE with its exits in place, confidence's joint loss) decide *what* is trained; the
trainer (helper branch ``genfast``) owns *how*: the loss, the budget, the content-hashed cache of the fine-tuned
weights. Its interface, called here and nowhere else::

    finetune_lm(backbone, head, datamodule, *, loss, token_exits, settings, cache_dir, progress) -> dict

- loss: ``"last"`` (the LM loss at layer L), ``"joint"`` (CALM: a weighted average of every layer's LM loss) or
  ``"token_exits"`` (HashEE: teacher forcing through :func:`raee.generation.step.forward_with_exits`);
- token_exits: for ``"token_exits"``, ``(input_ids (B, T), attention_mask (B, T), reads (B, T) bool) -> (B, T)``
  exit layers (reads: the positions whose next token is predicted, from the last prompt token on);
- settings: the budget and everything that must key the cache (the strategy's settings);
- it loads the fine-tuned weights into ``backbone`` and returns the budget record for summary.json
  (``{"by", "epochs", "steps", "lr", "head_lr", "seed", ...}``).

Tests replace the trainer with :func:`use_trainer` (or run with ``max_epochs=0``: the backbone as loaded).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from raee.errors import UserError

Trainer = Callable[..., dict[str, Any]]
_override: Trainer | None = None


def use_trainer(trainer: Trainer | None) -> None:
    """Set the trainer the strategies call (tests; None: the default, raee.generation.finetune.finetune_lm)."""
    global _override
    _override = trainer


def find_trainer() -> Trainer | None:
    if _override is not None:
        return _override
    try:
        from raee.generation.finetune import finetune_lm  # the training helper's module (branch genfast)
    except ImportError:
        return None
    return finetune_lm


def finetune(method: str, backbone: Any, head: Any, datamodule: Any, *, loss: str,
             token_exits: Callable | None = None, settings: dict[str, Any], cache_dir: Any = None,
             progress: bool = True) -> dict[str, Any]:
    """Fine-tune ``backbone`` for ``method`` with the generation trainer; a clear error when there is none."""
    trainer = find_trainer()
    if trainer is None:
        raise UserError(f"exit={method} with exit.max_epochs={settings.get('max_epochs')} fine-tunes the language "
                        "model, and this installation has no generation trainer (raee.generation.finetune): set "
                        "exit.max_epochs=0 to evaluate the backbone as loaded")
    return trainer(backbone, head, datamodule, loss=loss, token_exits=token_exits, settings=settings,
                   cache_dir=cache_dir, progress=progress)
