"""Label words -> the vocabulary rows a prompt head scores, and prompt-template checks.

Which token stands for a label word: the **first token of the word written after a space**
(" negative"), for decoders and encoders alike. A decoder's next token after "...:" is " word" in
BPE vocabularies (GPT-2, Llama, SmolLM2, Gemma), and LM-BFF scores RoBERTa's mask with the same
space-prefixed word; WordPiece (BERT) ignores the space. Only when that variant starts with a
bare space token (some SentencePiece vocabularies split " word" into "▁" + "word") is the word
taken without the space. A word of several tokens is scored by its first token; two label
words with the same first token cannot be told apart and are refused.
"""

from __future__ import annotations

import string
import warnings
from typing import Any

from raee.errors import UserError

#: placeholders a template may use
TEMPLATE_FIELDS = ("text", "text_pair", "mask")


def label_token_ids(tokenizer: Any, words: list[str], model: str = "the backbone") -> list[int]:
    """One vocabulary id per label word (see the module docstring for which token)."""
    ids, pieces = [], []
    for word in words:
        word = str(word).strip()
        if not word:
            raise UserError("a label word is empty: give one non-empty word per class in head.label_words")
        tokens = _first_meaningful_split(tokenizer, word)
        if tokens is None:
            split = tokenizer.convert_ids_to_tokens(tokenizer(" " + word, add_special_tokens=False)["input_ids"])
            raise UserError(
                f"label word {word!r} splits ambiguously in the tokenizer of {model}: {split} starts with a bare "
                "space/marker token, with or without a leading space, so no token stands for the word. Choose "
                "another label word (head.label_words)")
        ids.append(int(tokens[0]))
        pieces.append(tokenizer.convert_ids_to_tokens(tokens))
    _refuse_shared_first_tokens(words, ids, pieces, model)
    several = {str(w).strip(): p for w, p in zip(words, pieces) if len(p) > 1}
    if several:
        warnings.warn(f"label words of several tokens are scored by their first token in {model}: "
                      + ", ".join(f"{w!r} -> {p} (scored: {p[0]!r})" for w, p in several.items()), stacklevel=3)
    return ids


def _first_meaningful_split(tokenizer: Any, word: str) -> list[int] | None:
    for candidate in (" " + word, word):
        tokens = tokenizer(candidate, add_special_tokens=False)["input_ids"]
        if tokens and tokenizer.decode(tokens[:1]).strip():  # the first token carries text
            return list(tokens)
    return None


def _refuse_shared_first_tokens(words: list[str], ids: list[int], pieces: list[list[str]], model: str) -> None:
    seen: dict[int, int] = {}
    for i, token in enumerate(ids):
        if token in seen:
            j = seen[token]
            raise UserError(
                f"label words {str(words[j]).strip()!r} ({pieces[j]}) and {str(words[i]).strip()!r} ({pieces[i]}) "
                f"share their first token {pieces[i][0]!r} in the tokenizer of {model}: the prompt head scores one "
                "token per class, so these classes could not be told apart. Choose label words whose first tokens "
                "differ (single-token words are best), e.g. head.label_words='{negative: terrible, positive: great}'")
        seen[token] = i


def check_template(template: str, decoder: bool) -> str:
    """Validate a prompt template; return the form that is filled in.

    Encoders need ``{text}`` and exactly one ``{mask}`` (anywhere: LM-BFF's TREC template starts with it).
    Decoders read the answer as the next token after the prompt, so the answer slot must be the end:
    a ``{mask}`` is allowed only as the template's last placeholder and is removed, and so is trailing
    whitespace (a BPE model writes the space inside the answer token, " positive").
    """
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise UserError(f"prompt template {template!r} is malformed ({err}): write literal braces as {{{{ and }}}}"
                        ) from None
    unknown = sorted(set(fields) - set(TEMPLATE_FIELDS))
    if unknown:
        raise UserError(f"prompt template {template!r} has unknown placeholder(s) {unknown}: use {{text}}, "
                        "{text_pair} and {mask} (write literal braces as {{ and }})")
    if "text" not in fields:
        raise UserError(f"prompt template {template!r} has no {{text}} placeholder: the input text would never "
                        "reach the model; add {text} where the example goes, e.g. '{text} It was {mask}.'")
    masks = fields.count("mask")
    if masks > 1:
        raise UserError(f"prompt template {template!r} has {masks} {{mask}} placeholders: give exactly one answer slot")
    if not decoder:
        if not masks:
            raise UserError(f"prompt template {template!r} has no {{mask}}: an encoder (masked LM) reads its answer "
                            "at the mask token; add {mask} where the label word goes, e.g. '{text} It was {mask}.'")
        return template
    body = template.rstrip()
    if masks:
        if not body.endswith("{mask}"):
            raise UserError(
                f"prompt template {template!r} puts {{mask}} before the end: a decoder reads its answer as the next "
                "token after the prompt, so the answer slot must be the end. Move {mask} to the end or leave it out, "
                "e.g. 'Review: {text}\\nSentiment:'")
        body = body[: -len("{mask}")].rstrip()
    return body
