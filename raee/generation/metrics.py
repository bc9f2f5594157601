"""Quality of generated text: ROUGE-1/2/L F-measures (the ``rouge-score`` package, stemming on) and exact match."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def _scorer():
    try:
        import absl.logging  # rouge-score logs "Using default tokenizer." at INFO on every scorer

        absl.logging.set_verbosity(absl.logging.WARNING)
        from rouge_score import rouge_scorer
    except ImportError as err:  # a base dependency; a clear message if an environment lacks it
        raise ImportError("ROUGE needs the pip package rouge-score, which is not installed: pip install rouge-score "
                          "(a dependency of raee: pip install -e .)") from err
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def normalise(text: str) -> str:
    """Lower case, punctuation removed, white space collapsed (exact match compares these)."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def example_scores(predictions: Sequence[str], references: Sequence[str]) -> list[dict[str, float]]:
    """Per example: rouge1, rouge2, rougeL (F-measures in 0..1) and exact_match (0 or 1)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    scorer = _scorer()
    out = []
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)
        row = {name: float(scores[name].fmeasure) for name in ROUGE_TYPES}
        row["exact_match"] = float(normalise(prediction) == normalise(reference))
        out.append(row)
    return out


def mean_scores(rows: Sequence[dict[str, float]]) -> dict[str, float | None]:
    """The means of :func:`example_scores` (None without examples)."""
    names = (*ROUGE_TYPES, "exact_match")
    if not rows:
        return dict.fromkeys(names)
    return {name: sum(r[name] for r in rows) / len(rows) for name in names}
