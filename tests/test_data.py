"""Data layer: BBC News offline source, local files, hub errors, seeded splits and batches."""

from __future__ import annotations

import json
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from raee.data import TextClassificationDataModule, TextDataset, collate_batch, partition, subsample

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"
BBC_CLASSES = ["business", "entertainment", "politics", "sports", "tech"]
SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def bbc() -> TextClassificationDataModule:
    dm = TextClassificationDataModule("bbcnews")
    dm.setup("fit")
    return dm


def sizes(dm: TextClassificationDataModule) -> dict[str, int]:
    return {s: len(dm.split(s)) for s in SPLITS}


def texts(dm: TextClassificationDataModule, split: str) -> list[str]:
    return dm.split(split).texts


def toy_frame(n_per_class: int = 10, classes=("neg", "pos", "neu"), pair: bool = False) -> pd.DataFrame:
    rows = []
    for c in classes:
        for i in range(n_per_class):
            row = {"sentence": f"{c} example number {i}", "gold": c}
            if pair:
                row["hypothesis"] = f"hypothesis {i} for {c}"
            rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- BBC News

def test_bbcnews_loads_all_documents_in_five_sorted_classes(bbc):
    assert bbc.label_names == BBC_CLASSES
    assert bbc.num_classes == 5 and not bbc.is_pair
    assert sum(sizes(bbc).values()) == 2225
    counts = Counter()
    for s in SPLITS:
        counts.update(bbc.split(s).labels.tolist())
    assert [counts[i] for i in range(5)] == [510, 386, 417, 511, 401]
    first = bbc.split("train")[0]
    assert isinstance(first["text"], str) and len(first["text"]) > 100 and first["text_pair"] is None


def test_bbcnews_split_sizes_follow_fractions(bbc):
    got = sizes(bbc)
    assert abs(got["test"] - 0.33 * 2225) <= 1 and abs(got["validation"] - 0.1 * 2225) <= 1
    assert got["train"] == 2225 - got["test"] - got["validation"]


def test_seeded_split_is_deterministic_disjoint_and_covers_everything(bbc):
    again = TextClassificationDataModule("bbcnews", seed=42)
    other = TextClassificationDataModule("bbcnews", seed=7)
    for s in SPLITS:
        assert texts(again, s) == texts(bbc, s)
        assert torch.equal(again.split(s).labels, bbc.split(s).labels)
    assert texts(other, "test") != texts(bbc, "test")
    # union of the three splits is exactly the corpus (as a multiset: a few articles are duplicates)
    union = Counter(t for s in SPLITS for t in texts(bbc, s))
    union_other = Counter(t for s in SPLITS for t in texts(other, s))
    assert union == union_other and sum(union.values()) == 2225


def test_partition_indices_are_disjoint_cover_and_seeded():
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    parts = partition(labels, [60, 25, 15], seed=3)
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(100))
    assert [len(p) for p in parts] == [60, 25, 15]
    again = partition(labels, [60, 25, 15], seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not np.array_equal(partition(labels, [60, 25, 15], seed=4)[1], parts[1])
    # stratified: every class within one example of its proportional share in each part
    for part, size in zip(parts, [60, 25, 15]):
        counts = np.bincount(labels[part], minlength=4)
        expected = np.array([50, 30, 15, 5]) * size / 100
        assert np.all(np.abs(counts - expected) <= 1), (counts, expected)


def test_bbcnews_split_is_stratified(bbc):
    total = np.array([510, 386, 417, 511, 401])
    for s in SPLITS:
        counts = np.bincount(bbc.split(s).labels.numpy(), minlength=5)
        expected = total * len(bbc.split(s)) / 2225
        assert np.all(np.abs(counts - expected) <= 2), (s, counts, expected)


def test_subsampling_is_seeded_stratified_and_sized():
    small = TextClassificationDataModule("bbcnews", max_train_examples=300, max_eval_examples=100)
    assert sizes(small) == {"train": 300, "validation": 100, "test": 100}
    counts = np.bincount(small.split("train").labels.numpy(), minlength=5)
    assert np.all(np.abs(counts - np.array([510, 386, 417, 511, 401]) * 300 / 2225) <= 2)
    same = TextClassificationDataModule("bbcnews", max_train_examples=300, max_eval_examples=100)
    assert texts(same, "train") == texts(small, "train")
    full = TextClassificationDataModule("bbcnews")
    assert set(texts(small, "train")) <= set(texts(full, "train"))  # subsample of the same split
    assert subsample(10, None, None, seed=0) is None and subsample(10, None, 20, seed=0) is None


# ---------------------------------------------------------------- batches

def test_batches_follow_the_contract(bbc):
    batch = next(iter(bbc.train_dataloader()))
    assert set(batch) == {"text", "text_pair", "label", "index"}
    assert isinstance(batch["text"], list) and all(isinstance(t, str) for t in batch["text"])
    assert len(batch["text"]) == 32 and batch["text_pair"] is None
    assert batch["label"].dtype == torch.long and batch["label"].shape == (32,)
    assert batch["index"].dtype == torch.long and batch["index"].shape == (32,)
    train = bbc.split("train")
    for i, text, label in zip(batch["index"].tolist(), batch["text"], batch["label"].tolist()):
        assert train.texts[i] == text and int(train.labels[i]) == label
    # shuffled, but the same order on every call (seeded generator)
    assert batch["index"].tolist() != list(range(32))
    assert next(iter(bbc.train_dataloader()))["index"].tolist() == batch["index"].tolist()


def test_eval_loaders_are_in_order_and_predict_is_test(bbc):
    dm = TextClassificationDataModule("bbcnews", eval_batch_size=50, max_eval_examples=120)
    idx = torch.cat([b["index"] for b in dm.test_dataloader()])
    assert idx.tolist() == list(range(120))
    assert len(next(iter(dm.val_dataloader()))["text"]) == 50
    assert [b["index"].tolist() for b in dm.predict_dataloader()] == [b["index"].tolist() for b in dm.test_dataloader()]


def test_collate_regression_and_pairs():
    ds = TextDataset(["a", "b"], [0.5, 2.0], text_pairs=["x", "y"], task_type="regression")
    batch = collate_batch([ds[0], ds[1]])
    assert batch["label"].dtype == torch.float32 and batch["label"].tolist() == [0.5, 2.0]
    assert batch["text_pair"] == ["x", "y"] and batch["index"].tolist() == [0, 1]


# ---------------------------------------------------------------- local files

def test_csv_per_split_files_with_string_labels(tmp_path):
    train, test = toy_frame(10), toy_frame(4)
    train.to_csv(tmp_path / "train.csv", index=False)
    test.to_csv(tmp_path / "test.csv", index=False)
    dm = TextClassificationDataModule("local", train_file=str(tmp_path / "train.csv"),
                                      test_file=str(tmp_path / "test.csv"), text_column="sentence",
                                      label_column="gold", val_fraction=0.2, batch_size=4)
    assert dm.label_names == ["neg", "neu", "pos"]  # sorted names of the train split
    assert dm.name == "train"
    assert len(dm.split("test")) == 12  # given split kept as is
    assert len(dm.split("validation")) == 6 and len(dm.split("train")) == 24  # validation carved from train
    test_ds = dm.split("test")
    assert test_ds.texts == test["sentence"].tolist()
    assert test_ds.labels.tolist() == [dm.label_names.index(g) for g in test["gold"]]


def test_explicit_label_names_set_the_id_order(tmp_path):
    toy_frame(10).to_csv(tmp_path / "all.csv", index=False)
    dm = TextClassificationDataModule("local", file=str(tmp_path / "all.csv"), text_column="sentence",
                                      label_column="gold", label_names=["pos", "neu", "neg"])
    assert dm.label_names == ["pos", "neu", "neg"]
    ds = dm.split("train")
    for text, label in zip(ds.texts, ds.labels.tolist()):
        assert text.startswith(["pos", "neu", "neg"][label])


def test_sentence_pair_csv(tmp_path):
    toy_frame(12, pair=True).to_csv(tmp_path / "nli.csv", index=False)
    dm = TextClassificationDataModule("local", file=str(tmp_path / "nli.csv"), text_column="sentence",
                                      text_pair_column="hypothesis", label_column="gold", batch_size=5)
    assert dm.is_pair and sum(sizes(dm).values()) == 36
    batch = next(iter(dm.test_dataloader()))
    assert isinstance(batch["text_pair"], list) and len(batch["text_pair"]) == len(batch["text"]) == 5
    for text, pair in zip(batch["text"], batch["text_pair"]):
        cls, i = text.split()[0], text.split()[-1]
        assert pair == f"hypothesis {i} for {cls}"


def test_jsonl_with_integer_labels(tmp_path):
    path = tmp_path / "data.jsonl"
    with path.open("w") as fh:
        for i in range(40):
            fh.write(json.dumps({"text": f"doc {i}", "label": i % 4}) + "\n")
    dm = TextClassificationDataModule("local", file=str(path), max_train_examples=10)
    assert dm.label_names == ["0", "1", "2", "3"] and dm.num_classes == 4
    assert len(dm.split("train")) == 10
    for s in SPLITS:  # integer labels kept: label == original i % 4
        ds = dm.split(s)
        assert all(int(t.split()[1]) % 4 == lab for t, lab in zip(ds.texts, ds.labels.tolist()))


def test_parquet_regression(tmp_path):
    frame = pd.DataFrame({"s1": [f"a {i}" for i in range(30)], "s2": [f"b {i}" for i in range(30)],
                          "score": np.linspace(0, 5, 30)})
    frame.to_parquet(tmp_path / "sts.parquet")
    dm = TextClassificationDataModule("local", file=str(tmp_path / "sts.parquet"), text_column="s1",
                                      text_pair_column="s2", label_column="score", task_type="regression")
    assert dm.task_metric == "pearson" and dm.num_classes == 1 and dm.label_names == []
    batch = next(iter(dm.train_dataloader()))
    assert batch["label"].dtype == torch.float32
    ds = dm.split("train")
    assert all(abs(lab - 5 * int(t.split()[1]) / 29) < 1e-5 for t, lab in zip(ds.texts, ds.labels.tolist()))


# ---------------------------------------------------------------- config files

def test_conf_files_instantiate(tmp_path):
    small = instantiate(OmegaConf.load(CONF / "bbcnews_small.yaml"))
    assert isinstance(small, TextClassificationDataModule)
    assert sizes(small) == {"train": 300, "validation": 100, "test": 100} and small.name == "bbcnews_small"
    full_cfg = OmegaConf.load(CONF / "bbcnews.yaml")
    assert full_cfg.seed == 42 and full_cfg.batch_size == 32 and full_cfg.source == "bbcnews"
    csv_cfg = OmegaConf.load(CONF / "csv.yaml")
    assert OmegaConf.is_missing(csv_cfg, "train_file") and csv_cfg.label_column is None
    toy_frame(10).to_csv(tmp_path / "t.csv", index=False)
    csv_cfg.merge_with({"train_file": str(tmp_path / "t.csv"), "text_column": "sentence", "name": "toy"})
    with pytest.raises(Exception, match="needs data.label_column"):  # hydra wraps it in an InstantiationException
        instantiate(csv_cfg)
    csv_cfg.merge_with({"label_column": "gold"})
    assert instantiate(csv_cfg).num_classes == 3


def test_hf_sst2_conf_maps_glue_validation_to_test(monkeypatch):
    class FakeSplit:
        def __init__(self, n: int):
            self.frame = pd.DataFrame({"sentence": [f"s{i}" for i in range(n)], "label": [i % 2 for i in range(n)]})
            self.features = {"label": types.SimpleNamespace(names=["negative", "positive"])}

        def to_pandas(self) -> pd.DataFrame:
            return self.frame

    calls = []
    fake = types.ModuleType("datasets")

    def load_dataset(name, config=None, cache_dir=None):
        calls.append((name, config))
        return {"train": FakeSplit(50), "validation": FakeSplit(8), "test": FakeSplit(6)}

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    dm = instantiate(OmegaConf.load(CONF / "hf_sst2.yaml"))
    assert dm.label_names == ["negative", "positive"] and dm.name == "sst2"
    assert calls == [("glue", "sst2")]
    assert len(dm.split("test")) == 8 and len(dm.split("validation")) == 5 and len(dm.split("train")) == 45


# ---------------------------------------------------------------- errors

def local(path, **kw) -> TextClassificationDataModule:
    dm = TextClassificationDataModule("local", file=str(path), **kw)
    dm.setup()
    return dm


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*check the path"):
        local(tmp_path / "nope.csv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextClassificationDataModule("bbcnews", data_dir=str(tmp_path / "nope")).setup()


def test_unsupported_extension(tmp_path):
    (tmp_path / "data.xlsx").write_text("x")
    with pytest.raises(ValueError, match=r"unsupported file extension '\.xlsx'.*\.csv"):
        local(tmp_path / "data.xlsx")


def test_missing_label_and_text_columns_list_the_columns(tmp_path):
    toy_frame(5).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(ValueError, match=r"label_column='label' is not a column.*\['sentence', 'gold'\]"):
        local(tmp_path / "d.csv", text_column="sentence")
    with pytest.raises(ValueError, match=r"text_column='text' is not a column.*\['sentence', 'gold'\]"):
        local(tmp_path / "d.csv", label_column="gold")
    with pytest.raises(ValueError, match=r"text_pair_column='premise' is not a column"):
        local(tmp_path / "d.csv", text_column="sentence", label_column="gold", text_pair_column="premise")


def test_empty_dataset_and_empty_split(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        local(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("text,label\n")
    with pytest.raises(ValueError, match="has no rows"):
        local(tmp_path / "header.csv")
    (tmp_path / "two.csv").write_text("text,label\na,x\nb,y\n")
    with pytest.raises(ValueError, match="too few to carve"):
        local(tmp_path / "two.csv")


def test_a_train_split_of_one_class_is_refused(tmp_path):
    toy_frame(10, classes=("pos",)).to_csv(tmp_path / "one.csv", index=False)
    with pytest.raises(ValueError, match=r"train split of one has examples of one class only \('pos'\).*at least two"):
        local(tmp_path / "one.csv", text_column="sentence", label_column="gold")
    # two declared classes, but the training data holds only one of them
    with pytest.raises(ValueError, match="one class only"):
        local(tmp_path / "one.csv", text_column="sentence", label_column="gold", label_names=["neg", "pos"])
    toy_frame(10, classes=("neg", "pos")).to_csv(tmp_path / "two.csv", index=False)
    assert local(tmp_path / "two.csv", text_column="sentence", label_column="gold").label_names == ["neg", "pos"]


def test_fractions_outside_unit_interval():
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"val_fraction=.* outside \(0, 1\)"):
            TextClassificationDataModule("bbcnews", val_fraction=bad)
        with pytest.raises(ValueError, match=r"test_fraction=.* outside \(0, 1\)"):
            TextClassificationDataModule("bbcnews", test_fraction=bad)
    with pytest.raises(ValueError, match="leaves no training data"):
        TextClassificationDataModule("bbcnews", val_fraction=0.5, test_fraction=0.5)


def test_too_small_class_falls_back_to_unstratified_split(tmp_path):
    frame = pd.concat([toy_frame(20, classes=("a", "b")), pd.DataFrame({"sentence": ["rare"], "gold": ["c"]})])
    frame.to_csv(tmp_path / "d.csv", index=False)
    with pytest.warns(UserWarning, match=r"cannot stratify.*'2': 1"):
        dm = local(tmp_path / "d.csv", text_column="sentence", label_column="gold")
    assert sum(sizes(dm).values()) == 41 and dm.label_names == ["a", "b", "c"]


def test_label_errors(tmp_path):
    toy_frame(5).to_csv(tmp_path / "train.csv", index=False)
    toy_frame(2, classes=("neg", "other")).to_csv(tmp_path / "test.csv", index=False)
    with pytest.raises(ValueError, match=r"labels \['other'\] that are not among the class names"):
        TextClassificationDataModule("local", train_file=str(tmp_path / "train.csv"),
                                     test_file=str(tmp_path / "test.csv"), text_column="sentence",
                                     label_column="gold").setup()
    pd.DataFrame({"text": ["a", "b", "c"], "label": [0.5, 1.0, 2.0]}).to_csv(tmp_path / "f.csv", index=False)
    with pytest.raises(ValueError, match="task_type: regression"):
        local(tmp_path / "f.csv")
    with pytest.raises(ValueError, match="task_metric='pearson' does not fit"):
        TextClassificationDataModule("bbcnews", task_metric="pearson")
    with pytest.raises(ValueError, match="data source 'csv' is not supported"):
        TextClassificationDataModule("csv")


def test_hub_without_datasets_package_says_how_to_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    dm = TextClassificationDataModule("hf", hf_name="glue", hf_config="sst2", text_column="sentence")
    with pytest.raises(ImportError, match=r"pip install -e '\.\[hub\]'.*network.*local file"):
        dm.setup()


def test_hub_unreachable_says_how_to_fix(monkeypatch):
    fake = types.ModuleType("datasets")

    def load_dataset(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    dm = TextClassificationDataModule("hf", hf_name="glue", hf_config="sst2", text_column="sentence")
    with pytest.raises(ConnectionError, match=r"could not load hub dataset 'glue'.*couldn't connect.*"
                                              r"pip install -e '\.\[hub\]'.*network.*local file"):
        dm.setup()


# ---------------------------------------------------------------- packaged sentiment data (small fixtures)

def write_rotten_tomatoes(path: Path, n: int = 60) -> Path:
    rows = []
    for i in range(n):
        rows.append({"category": "fresh" if i % 3 else "rotten", "text": f" snippet {i} about a film ",
                     "movie_name": f"m{i}", "has_plot_and_reviews": True})
    rows += [{"category": "plot", "text": "a plot summary, not a review", "movie_name": "p", "has_plot_and_reviews": 1},
             {"category": "fresh", "text": " snippet 1 about a film ", "movie_name": "dup", "has_plot_and_reviews": 1},
             {"category": "rotten", "text": None, "movie_name": "empty", "has_plot_and_reviews": 1}]
    pd.DataFrame(rows).to_csv(path, index=False, compression="bz2")
    return path


def write_imdb(path: Path, n: int = 50) -> Path:
    rows = [{"review": f"Review {i}.<br /><br />It was {'good' if i % 2 else 'bad'}.<BR/>The end.",
             "sentiment": "positive" if i % 2 else "negative"} for i in range(n)]
    rows.append(dict(rows[0]))  # an exact duplicate
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_rotten_tomatoes_drops_plot_duplicate_and_empty_rows(tmp_path):
    dm = TextClassificationDataModule("rotten_tomatoes", file=str(write_rotten_tomatoes(tmp_path / "rt.csv.bz2")),
                                      val_fraction=0.1, test_fraction=0.2, seed=3)
    dm.setup()
    assert dm.label_names == ["negative", "positive"] and dm.name == "rotten_tomatoes"
    everything = [t for s in SPLITS for t in texts(dm, s)]
    assert len(everything) == 60 == len(set(everything))
    assert not any("plot summary" in t for t in everything)
    assert all(t == t.strip() for t in everything)
    assert sizes(dm) == {"train": 42, "validation": 6, "test": 12}
    for s in SPLITS:  # stratified: a third rotten (negative) in every split
        labels = dm.split(s).labels
        assert abs(float((labels == 0).float().mean()) - 1 / 3) < 0.1


def test_imdb_removes_br_tags_and_duplicates_and_subsamples_stratified(tmp_path):
    dm = TextClassificationDataModule("imdb", file=str(write_imdb(tmp_path / "imdb.csv")), max_train_examples=20,
                                      max_eval_examples=6, val_fraction=0.2, test_fraction=0.2, seed=0)
    dm.setup()
    everything = [t for s in SPLITS for t in texts(dm, s)]
    assert not any("<br" in t.lower() for t in everything)
    assert "Review 1. It was good. The end." in everything or len(everything) < 50
    assert sizes(dm) == {"train": 20, "validation": 6, "test": 6}
    assert len(set(everything)) == len(everything)
    for s in SPLITS:
        counts = Counter(dm.split(s).labels.tolist())
        assert counts[0] == counts[1]


def test_packaged_source_with_a_missing_local_copy_names_the_fix(tmp_path):
    dm = TextClassificationDataModule("imdb", file=str(tmp_path / "nope.csv"))
    with pytest.raises(FileNotFoundError, match="leave data.file null"):
        dm.setup()


@pytest.mark.parametrize("name", ["imdb", "rotten_tomatoes"])
def test_sentiment_configs_carry_default_prompts(name):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    dm = instantiate(cfg)
    assert dm.source == name
    # IMDB is subsampled for real LMs; Rotten Tomatoes keeps every example (HashEE needs the whole train split;
    # the LM and pareto experiments take their own subsamples)
    expected = (1000, 300) if name == "imdb" else (None, None)
    assert (dm.max_train_examples, dm.max_eval_examples) == expected
    for kind in ("mlm", "causal"):
        prompt = dm.prompt[kind]
        assert "{text}" in prompt["template"] and set(prompt["label_words"]) == {"negative", "positive"}
    assert isinstance(dm.prompt, dict) and isinstance(dm.prompt["mlm"]["label_words"], dict)
