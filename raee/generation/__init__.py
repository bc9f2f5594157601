"""Generation tasks: prompts, a layer-by-layer decoding loop with token-level exits, exit methods and metrics.

- :mod:`~raee.generation.prompts`: ``head=lm``, prompt formatting (chat templates) and target encoding;
"""

from raee.generation.prompts import LMHead, end_token_ids, is_generation_task, newline_token_ids

__all__ = ["LMHead", "end_token_ids", "is_generation_task", "newline_token_ids"]
