"""Exit methods for generation: when each token leaves the decoder.

Every strategy plans a token's exit layer from its id (:meth:`GenerationExit.plan`); a dynamic one may end the
read token (the one whose next token is predicted) earlier from the LM head's output at a layer
(:meth:`GenerationExit.should_exit`). The decoding loop (:mod:`raee.generation.decode`) does the rest.

- :class:`FullGeneration` (``exit=full``): every token runs all L layers, the reference;
- :class:`FixedGeneration` (``exit=fixed``): every token, prompt and generated, leaves at layer l: the bound of
  a shallower model;
- HashEE (``exit=hashee``) and CALM's confidence (``exit=confidence``): :mod:`raee.generation.hashee`,
  :mod:`raee.generation.confidence`.

The ``exit=`` configs are shared with classification: :func:`for_generation` turns the classification object
a config built (``FullModel``, ``FixedLayer``, ``HashEEExit``) into its generation counterpart, and refuses
methods that cannot generate with one message naming those that can.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from raee.errors import UserError
from raee.exits.base import check_layer


class GenerationExit:
    """Base of the generation exit strategies (see the module docstring)."""

    #: name in configs, summaries and reports
    name: str = "generation"
    #: True when :meth:`should_exit` decides at run time (the loop then reads the LM head at every layer it checks)
    dynamic: bool = False
    #: first layer a dynamic strategy checks
    min_layer: int = 1
    #: dynamic strategies that decide from the LM head's output (the loop reads it at every layer checked)
    needs_logits: bool = True

    def __init__(self) -> None:
        self.num_layers = 0

    def validate(self, num_layers: int) -> None:
        """Raise a clear error when the settings do not fit a backbone with ``num_layers`` layers."""

    def prepare(self, backbone: Any, head: Any) -> None:
        """One-time setup with the bound backbone and LM head, before decoding."""
        self.validate(backbone.num_layers)
        self.num_layers = backbone.num_layers

    def fit(self, backbone: Any, head: Any, datamodule: Any, cache_dir: Any = None, progress: bool = True) -> None:
        """Fine-tune or calibrate on the training / validation split (HashEE, confidence); nothing by default."""

    def knobs(self) -> dict[str, Any]:
        return {}

    def budget(self) -> dict[str, Any] | None:
        """How the evaluated weights were fine-tuned (None: the backbone as loaded)."""
        return None

    def plan(self, input_ids: torch.Tensor, reads: torch.Tensor) -> torch.Tensor:
        """(B, N) exit layer 0..L of every token of a step; reads: (B, N) bool, the tokens whose next token is read
        (the last prompt token, then every generated one). Default: L (no exit)."""
        return torch.full_like(input_ids, self.num_layers)

    def checks(self, layer: int) -> bool:
        """Dynamic strategies: whether :meth:`should_exit` is asked after ``layer``."""
        return layer >= self.min_layer

    def should_exit(self, layer: int, logits: torch.Tensor | None, hidden: torch.Tensor | None = None,
                    previous: torch.Tensor | None = None) -> torch.Tensor:
        """Dynamic strategies: the read tokens still running at ``layer`` -> (n,) bool, True = leave now.
        logits: their (n, V) LM-head output (when :attr:`needs_logits`); hidden: their (n, H) states; previous:
        their states at the previous layer checked (None at the first). Default: no token leaves, as
        :meth:`plan`'s default plans no exit; a dynamic strategy (``dynamic = True``) overrides this."""
        rows = logits if logits is not None else hidden
        return torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)

    def wall_clock_reference(self) -> GenerationExit:
        """The full model to time this strategy against (same loop, no exits)."""
        return FullGeneration()

    def report(self, strategy_stats: dict[str, Any] | None) -> dict[str, Any]:
        """Summary fields of the strategy's own, from its ``stats`` summed over the run (self-speculative
        decoding: the acceptance rate). Nothing by default."""
        return {}

    def generate(self, backbone: Any, prompts: list[list[int]], max_new_tokens: int, end_ids: set[int],
                 newline_ids: set[int] | None = None, pad_id: int = 0) -> Any:
        """Greedy generation of a batch of prompts (token ids) -> :class:`~raee.generation.decode.GenerationOutput`.
        The layerwise decoding loop with this strategy's exits; a method with its own loop (self-speculative
        decoding) overrides this."""
        from raee.generation.decode import Decoder

        if self.num_layers != backbone.num_layers:  # not prepared for this backbone yet (a direct call)
            self.prepare(backbone, None)
        decoder = self.__dict__.get("_decoder")
        if decoder is None or decoder.backbone is not backbone:
            decoder = Decoder(backbone, self)
            self.__dict__["_decoder"] = decoder
        return decoder.generate(prompts, max_new_tokens, end_ids, newline_ids, pad_id)


class FullGeneration(GenerationExit):
    """Every token runs all L layers: the reference for quality, FLOPs and wall-clock speed-ups."""

    name = "full"


class FixedGeneration(GenerationExit):
    """Every token, prompt and generated, leaves at ``layer`` (0 = the embeddings): a shallower model."""

    name = "fixed"

    def __init__(self, layer: int) -> None:
        super().__init__()
        self.layer = int(layer)

    def validate(self, num_layers: int) -> None:
        check_layer(self.layer, num_layers, "exit.layer")

    def knobs(self) -> dict[str, Any]:
        return {"layer": self.layer}

    def plan(self, input_ids: torch.Tensor, reads: torch.Tensor) -> torch.Tensor:
        return torch.full_like(input_ids, self.layer)


#: classification strategy class name -> builder of its generation counterpart (a plug-in point: genfast's
#: self-speculative decoding and any later method register here or pass a GenerationExit directly)
CONVERTERS: dict[str, Callable[[Any], GenerationExit]] = {
    "FullModel": lambda s: FullGeneration(),
    "FixedLayer": lambda s: FixedGeneration(s.layer),
}


def generation_methods() -> list[str]:
    """The exit= names that can generate, for messages."""
    return ["full", "fixed", "hashee", "confidence", *EXTRA_METHODS]


#: generation-only methods other modules add (self_speculative)
EXTRA_METHODS: list[str] = []


def for_generation(strategy: Any) -> GenerationExit:
    """The generation strategy for what an ``exit=`` config built; a clear error for a method that cannot generate."""
    if isinstance(strategy, GenerationExit):
        return strategy
    convert = CONVERTERS.get(type(strategy).__name__)
    if convert is None:
        name = getattr(strategy, "name", type(strategy).__name__)
        raise UserError(f"exit={name} cannot generate text: it decides per example from class predictions. On a "
                        f"generation task use exit={', '.join(generation_methods())}")
    return convert(strategy)
