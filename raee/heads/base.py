"""The head interface: class logits from the hidden state of any layer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from raee.backbones.base import LayerState, LayerwiseBackbone
from raee.errors import UserError


class Head(nn.Module, ABC):
    """Maps a :class:`LayerState` of any layer 0..L to class logits (B, C).

    Lifecycle: construct from config -> :meth:`bind` to a backbone and the task's label names
    -> :meth:`fit` if :attr:`needs_fit` (prototype, linear) -> call on states.
    """

    #: heads that must see training data before use (prototype, linear)
    needs_fit: bool = False
    #: heads that can output one real value per example (regression tasks: linear)
    supports_regression: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.label_names: list[str] = []
        self.num_layers: int = 0
        self.regression = False  # set by use_task("regression"): one output, no classes

    def use_task(self, task_type: str) -> None:
        """Set the task before :meth:`bind`: "classification" or "regression" (one real output)."""
        if task_type not in ("classification", "regression"):
            raise UserError(f"task_type={task_type!r} is not supported: use classification or regression")
        if task_type == "regression" and not self.supports_regression:
            raise UserError(f"{type(self).__name__} predicts classes and cannot do regression: use head=linear "
                            "(a regression output per layer) for a regression dataset")
        self.regression = task_type == "regression"

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def bind(self, backbone: LayerwiseBackbone, label_names: list[str]) -> None:
        """Attach to a backbone and a label set; subclasses check compatibility here."""
        if not label_names:
            raise UserError("the head needs at least one class; the dataset has no label names")
        self.label_names = list(label_names)
        self.num_layers = backbone.num_layers

    def format(self, texts: list[str], text_pairs: list[str] | None,
               backbone: LayerwiseBackbone) -> tuple[list[str], list[str] | None]:
        """Turn raw inputs into what the backbone reads (prompt templates); identity by default."""
        return texts, text_pairs

    @abstractmethod
    def forward(self, state: LayerState) -> torch.Tensor:
        """(B, T, H) state of layer ``state.layer`` -> (B, C) logits."""

    def fit(self, backbone: LayerwiseBackbone, datamodule: Any, progress: bool = True) -> None:
        """Learn from the training split (heads with :attr:`needs_fit`)."""

    def save(self, directory: Any, backbone: LayerwiseBackbone | None = None) -> None:
        """Write what :meth:`fit` learned (safetensors + JSON) to ``directory``."""

    def load(self, directory: Any, backbone: LayerwiseBackbone | None = None) -> None:
        """Read what :meth:`save` wrote; ``backbone`` receives fine-tuned weights when there are any."""

    def describe(self) -> dict[str, Any]:
        """Fields that identify this head (stored in databases and summaries)."""
        return {"type": type(self).__name__}
