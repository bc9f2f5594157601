"""Generation tasks: prompts, a layer-by-layer decoding loop with token-level exits, exit methods and metrics.

- :mod:`~raee.generation.prompts`: ``head=lm``, prompt formatting (chat templates) and target encoding;
- :mod:`~raee.generation.layers`: each decoder family's layer in the parts a per-token exit needs;
- :mod:`~raee.generation.step`: one layer with per-token exits, and the differentiable cache-free forward;
- :mod:`~raee.generation.decode`: the decoding loop (greedy, KV cache per layer, state propagation);
- :mod:`~raee.generation.strategies`, :mod:`~raee.generation.hashee`, :mod:`~raee.generation.confidence`:
  the exit methods (full, fixed, HashEE, CALM's confidence); :mod:`~raee.generation.speculative`: LayerSkip's
  self-speculative decoding (its own draft / verify loop);
- :mod:`~raee.generation.flops`, :mod:`~raee.generation.metrics`, :mod:`~raee.generation.evaluate`,
  :mod:`~raee.generation.experiment`: costs, ROUGE, decoding a split, one run;
- :mod:`~raee.generation.finetuning`: where the fine-tunes come from: :mod:`~raee.generation.finetune` (cached
  by content) and :mod:`~raee.generation.trainer` (the training loop), losses in :mod:`~raee.generation.lm_losses`.
"""

from raee.generation.prompts import LMHead, end_token_ids, is_generation_task, newline_token_ids
from raee.generation.strategies import FixedGeneration, FullGeneration, GenerationExit, for_generation
from raee.generation.hashee import HashEEGeneration  # noqa: E402 - registers exit=hashee for generation
from raee.generation.confidence import ConfidenceGeneration  # noqa: E402
from raee.generation.step import forward_with_exits  # noqa: E402
from raee.generation.speculative import SelfSpeculativeGeneration  # noqa: E402 - registers exit=self_speculative

__all__ = ["ConfidenceGeneration", "FixedGeneration", "FullGeneration", "GenerationExit", "HashEEGeneration", "LMHead",
           "SelfSpeculativeGeneration", "end_token_ids", "for_generation", "forward_with_exits", "is_generation_task",
           "newline_token_ids"]
