"""Model weights as safetensors files (never pickle): an atomic save and a check before loading."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from raee.atomic import atomic_path
from raee.errors import UserError


def save_state(path: str | Path, state: dict[str, torch.Tensor]) -> None:
    """Write a state dict to ``path`` as safetensors, atomically (a crash leaves no half file)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))


def check_state(expected: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse saved weights whose names or shapes differ from the model's (before any is loaded)."""
    missing, extra = sorted(set(expected) - set(loaded)), sorted(set(loaded) - set(expected))
    shapes = [k for k in set(expected) & set(loaded) if tuple(expected[k].shape) != tuple(loaded[k].shape)]
    if missing or extra or shapes:
        raise UserError(f"{path} does not fit this model (missing {missing[:3]}, unexpected {extra[:3]}, "
                        f"other shapes {sorted(shapes)[:3]}): delete it to train again")
