"""Generation data: (source, target) text pairs, e.g. a news article and its headline.

A generation split is a :class:`~raee.data.dataset.TextDataset` whose ``targets`` hold the reference
texts; its ``labels`` are only strata for seeded splitting (BBC News' classes, so that
``bbcnews_headlines`` has exactly the train/validation/test split of ``bbcnews``; 0 for sources
without classes). Sources return :class:`~raee.data.sources.RawData` frames with the columns
``text`` (source), ``target`` and, where known, ``label`` (the strata).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from raee.data.sources import RawData, load_bbcnews
from raee.errors import UserError

#: the task type of (source, target) text pairs
GENERATION = "generation"
#: metrics of a generation run (summary keys); ROUGE-L is the default task metric
GENERATION_METRICS = ("rougeL", "rouge1", "rouge2", "exact_match")


def _fix_encoding(text: str) -> str:
    """BBC News files are UTF-8 read as latin-1 by the classification loader ('Â£' for '£'): undo that when
    the bytes round-trip, keep the text as it is otherwise."""
    try:
        return text.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def load_bbcnews_headlines(data_dir: str | Path | None = None) -> RawData:
    """BBC News as (article body, headline) pairs: every file's first line is its headline (3-9 words, 5 on
    average), the rest is the body. ``label`` keeps the class, so that splits equal ``bbcnews``'s."""
    raw = load_bbcnews(data_dir)
    frame = raw.frames["train"]
    heads, bodies = [], []
    for text in frame["text"]:
        head, _, body = _fix_encoding(str(text)).partition("\n")
        heads.append(head.strip())
        bodies.append(body.strip())
    out = pd.DataFrame({"text": bodies, "target": heads, "label": frame["label"]})
    return RawData({"train": out}, origin=raw.origin.replace("bbcnews", "bbcnews_headlines", 1),
                   label_names=raw.label_names, sources=raw.sources)


def as_generation_frames(raw: RawData) -> RawData:
    """Frames a classification source returned with the target under ``label`` (a local file or the hub read with
    ``label_column=target_column``) -> columns text, target; no strata."""
    frames = {split: pd.DataFrame({"text": f["text"], "target": f["label"]}) for split, f in raw.frames.items()}
    return RawData(frames, origin=raw.origin, sources=raw.sources)


def check_generation_frames(raw: RawData, text_column: str = "text", target_column: str = "target") -> None:
    """Refuse a split with a missing or empty target, or an empty source (after stripping white space): one
    message naming the column, the split, how many rows and the first of them."""
    for split, frame in raw.frames.items():
        for column, name, what in (("target", target_column, "target"), ("text", text_column, "source")):
            values = frame[column]
            empty = values.isna() | (values.astype(str).str.strip() == "")
            if bool(empty.any()):
                rows = [int(i) for i in empty.to_numpy().nonzero()[0][:5]]
                raise UserError(
                    f"the {what} column {name!r} of split {split!r} ({raw.origin}) has {int(empty.sum())} missing or "
                    f"empty value(s) (rows {rows}{' ...' if int(empty.sum()) > 5 else ''}): a generation example "
                    f"needs a non-empty source and target; drop or fill those rows")


def strata(frame: pd.DataFrame, names: list[str] | None) -> list[int]:
    """What a generation split is stratified by: class ids (in the order of ``names``, else sorted) when the source
    has a class column, so that the split equals the classification dataset's; else one stratum."""
    if "label" not in frame.columns:
        return [0] * len(frame)
    values = frame["label"].astype(str).tolist()
    index = {n: i for i, n in enumerate(names or sorted(set(values)))}
    return [index[v] for v in values]


def check_generation_settings(max_new_tokens: int, max_source_tokens: int | None) -> None:
    """Refuse decoding settings that cannot produce text."""
    if isinstance(max_new_tokens, bool) or int(max_new_tokens) <= 0:
        raise UserError(f"data.max_new_tokens={max_new_tokens} must be a positive number of tokens to generate "
                        "(e.g. 24 for headlines)")
    if max_source_tokens is not None and int(max_source_tokens) <= 0:
        raise UserError(f"data.max_source_tokens={max_source_tokens} must be a positive number of tokens (the source "
                        "is cut there) or null (no cut)")
