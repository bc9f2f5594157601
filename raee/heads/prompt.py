"""Zero-shot prompt head: template + verbalizer through the model's own LM head (RAEE paper).

For encoders the logits are read at the mask token; for causal decoders at the last real
token (the next-token prediction). Only the label words' logits are kept.
"""

from __future__ import annotations

from typing import Any

import torch

from raee.backbones.base import LayerState, LayerwiseBackbone
from raee.heads.base import Head


class PromptHead(Head):
    """template: uses ``{text}`` (and ``{text_pair}`` for pair tasks) and, for encoders, ``{mask}``.
    label_words: one word per class, in label order (a list) or by label name (a dict)."""

    def __init__(self, template: str = "{text} It was {mask}.", label_words: list[str] | dict[str, str] | None = None
                 ) -> None:
        super().__init__()
        if "{text}" not in template:
            raise ValueError(f"prompt template '{template}' has no {{text}} placeholder")
        if not label_words:
            raise ValueError("head.label_words is empty: give one label word per class, e.g. [terrible, great]")
        self.template = template
        self.label_words = label_words
        self.register_buffer("label_ids", torch.zeros(0, dtype=torch.long), persistent=False)
        self._mask_token: str | None = None
        self._mask_token_id: int | None = None
        self._decoder = False
        self._lm_logits = None  # the backbone's LM head, set by bind()

    def bind(self, backbone: LayerwiseBackbone, label_names: list[str]) -> None:
        super().bind(backbone, label_names)
        if not backbone.has_lm_head:
            backbone.lm_logits(torch.zeros(1, backbone.hidden_size))  # raises the explanatory error
        self._decoder = backbone.is_decoder
        if not self._decoder:
            if "{mask}" not in self.template:
                raise ValueError(f"prompt template '{self.template}' has no {{mask}}: an encoder reads its prediction "
                                 "at the mask token")
            if backbone.tokenizer.mask_token is None:
                raise ValueError(f"tokenizer of '{backbone.name}' has no mask token; use a masked-LM backbone")
            self._mask_token = backbone.tokenizer.mask_token
            self._mask_token_id = backbone.tokenizer.mask_token_id
        self._lm_logits = backbone.lm_logits
        words = self._words_in_label_order(label_names)
        self.label_ids = torch.tensor([_single_token_id(backbone.tokenizer, w) for w in words],
                                      dtype=torch.long, device=backbone.device)

    def _words_in_label_order(self, label_names: list[str]) -> list[str]:
        if isinstance(self.label_words, dict) or hasattr(self.label_words, "keys"):
            missing = [n for n in label_names if n not in self.label_words]
            if missing:
                raise ValueError(f"head.label_words has no word for classes {missing}; it has {list(self.label_words)}")
            return [str(self.label_words[n]) for n in label_names]
        words = [str(w) for w in self.label_words]
        if len(words) != len(label_names):
            raise ValueError(f"head.label_words has {len(words)} words but the dataset has {len(label_names)} classes "
                             f"{label_names}: give one word per class")
        return words

    def format(self, texts: list[str], text_pairs: list[str] | None,
               backbone: LayerwiseBackbone) -> tuple[list[str], list[str] | None]:
        # Cut the text (not the template) so that truncation never removes the mask token.
        tok = backbone.tokenizer
        budget = max(8, backbone.max_length - len(tok.tokenize(self.template)) - 4)
        if text_pairs is not None:
            budget //= 2
        mask = self._mask_token or ""

        def cut(t: str) -> str:
            ids = tok(t, add_special_tokens=False, truncation=True, max_length=budget)["input_ids"]
            return tok.decode(ids) if len(ids) >= budget else t

        out = []
        for i, text in enumerate(texts):
            pair = cut(text_pairs[i]) if text_pairs is not None else ""
            out.append(self.template.format(text=cut(text), text_pair=pair, mask=mask))
        return out, None

    def positions(self, state: LayerState) -> torch.Tensor:
        """(B,) index of the token whose LM prediction is read."""
        if self._decoder:
            return state.attention_mask.sum(1).long() - 1
        is_mask = state.input_ids == self._mask_token_id
        if not bool(is_mask.any(1).all()):
            raise ValueError("an input lost its mask token (truncated?); raise backbone.max_length")
        return is_mask.float().argmax(1)

    def forward(self, state: LayerState) -> torch.Tensor:
        rows = torch.arange(state.batch_size, device=state.hidden.device)
        hidden = state.hidden[rows, self.positions(state)]  # (B, H)
        return self._lm_logits(hidden)[:, self.label_ids]

    def describe(self) -> dict[str, Any]:
        return {"type": "prompt", "template": self.template, "label_words": _plain(self.label_words)}


def _plain(words: Any) -> Any:
    return dict(words) if hasattr(words, "keys") else list(words)


def _single_token_id(tokenizer: Any, word: str) -> int:
    """The id of ``word`` as one token (tried with a leading space first, as BPE vocabularies store it)."""
    tried = []
    for candidate in (" " + word, word):
        ids = tokenizer(candidate, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            return int(ids[0])
        tried.append(tokenizer.convert_ids_to_tokens(ids))
    raise ValueError(f"label word '{word}' is not a single token of the tokenizer (it splits into {tried[-1]}); "
                     "choose a word that the vocabulary holds whole")
