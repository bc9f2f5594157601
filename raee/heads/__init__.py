"""Heads: class logits from any layer. Add one: subclass Head, add conf/head/<name>.yaml."""

from raee.heads.base import Head
from raee.heads.linear import LinearHead
from raee.heads.pooling import pool
from raee.heads.prompt import PromptHead
from raee.heads.prototype import PrototypeHead

__all__ = ["Head", "LinearHead", "PromptHead", "PrototypeHead", "pool"]
