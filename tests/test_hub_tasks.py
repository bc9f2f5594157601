"""The RAEE table's 8 hub tasks (conf/data/hf_*.yaml): composition, and loading small local fixtures in
the same column schema (offline) into a prompt head whose verbalizer resolves on tiny models."""

from __future__ import annotations

import json
import warnings

import pandas as pd
import pytest
from hydra.utils import instantiate

from raee.heads.verbalizer import check_template, label_token_ids
from tests.test_config import compose_cfg

#: task -> (hub dataset, metric, class names the data module ends up with, in id order)
TASKS = {
    "sst2": ("glue", "accuracy", ["negative", "positive"]),
    "sst5": ("SetFit/sst5", "accuracy", ["very negative", "negative", "neutral", "positive", "very positive"]),
    "mr": ("jxm/mr", "accuracy", ["negative", "positive"]),
    "cr": ("SetFit/SentEval-CR", "accuracy", ["negative", "positive"]),
    "mpqa": ("jxm/mpqa", "accuracy", ["negative", "positive"]),
    "subj": ("SetFit/subj", "accuracy", ["objective", "subjective"]),
    "trec": ("CogComp/trec", "accuracy", ["ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"]),
    "cola": ("glue", "mcc", ["unacceptable", "acceptable"]),
}
#: where the hub gives class names through a ClassLabel feature (the config leaves label_names null)
CLASS_LABEL_TASKS = {"sst2", "trec", "cola"}
SENTENCES = ["a gripping , funny film", "the plot is a mess", "what is the capital of peru ?",
             "who wrote hamlet ?", "the battery lasts all day", "this is the worst phone i have owned",
             "he said that the talks would go on", "the book was read by the student quickly"]


def test_every_paper_task_has_a_hub_config():
    from raee.paper_results import RAEE_TABLE1, paper_dataset_for

    for task, (hub, metric, _) in TASKS.items():
        data = compose_cfg([f"data=hf_{task}"]).data
        assert data.source == "hf" and data.hf_name == hub and data.name == task
        assert data.task_metric == metric
        assert paper_dataset_for(data.name, RAEE_TABLE1) in RAEE_TABLE1.datasets  # the report finds its column
        for kind, decoder in (("mlm", False), ("causal", True)):
            check_template(data.prompt[kind].template, decoder=decoder)  # valid for its kind of model


def _write_split(path, data, n, num_classes):
    label_column, text_column = data.label_column, data.text_column
    frame = pd.DataFrame({text_column: [SENTENCES[i % len(SENTENCES)] + f" #{i}" for i in range(n)],
                          label_column: [i % num_classes for i in range(n)]})
    if path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_csv(path, index=False)
    return str(path)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_local_fixture_in_the_hub_schema_loads_and_the_verbalizer_resolves(task, tiny_backbones, tmp_path):
    _, _, names = TASKS[task]
    cfg = compose_cfg([f"data=hf_{task}", "head=prompt"])
    data, c = cfg.data, len(names)
    files = {"train_file": _write_split(tmp_path / "train.csv", data, 6 * c, c),
             "test_file": _write_split(tmp_path / "test.jsonl", data, 2 * c, c)}
    if "validation" in data.hf_splits:  # the hub dataset has its own validation split: give one too
        files["validation_file"] = _write_split(tmp_path / "dev.csv", data, c, c)
    extra = {"label_names": names} if task in CLASS_LABEL_TASKS else {}  # offline stand-in for the ClassLabel
    dm = instantiate(data, source="local", **files, **extra)
    dm.setup()
    assert dm.name == task and dm.label_names == names and dm.task_metric == TASKS[task][1]
    assert len(dm.split("test")) == 2 * c and sorted(set(dm.split("test").labels.tolist())) == list(range(c))
    batch = next(iter(dm.test_dataloader()))
    for family in ("bert", "gpt2"):
        bb = tiny_backbones[family]
        head = instantiate(cfg.head)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # several-token words are scored by their first token
            head.bind(bb, dm.label_names)
        assert head.kind == ("causal" if bb.is_decoder else "mlm")
        assert len(set(head.label_ids.tolist())) == c  # one distinct vocabulary row per class
        texts, _ = head.format(batch["text"], None, bb)
        assert head(bb.all_layers(**bb.tokenize(texts))[-1]).shape == (len(texts), c)


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["smollm2", pytest.param("gemma3_270m", marks=pytest.mark.real_lm)])
def test_causal_label_words_are_single_distinct_tokens_on_the_real_lms(name):
    from raee.assets import GEMMA3_270M_GGUF, SMOLLM2_GGUF
    from tests.test_real_lms import _backbone_or_skip

    tok = _backbone_or_skip(SMOLLM2_GGUF if name == "smollm2" else GEMMA3_270M_GGUF, name).tokenizer
    for task in TASKS:
        words = list(compose_cfg([f"data=hf_{task}"]).data.prompt.causal.label_words.values())
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no word may need its first token only
            ids = label_token_ids(tok, words, name)
        assert len(set(ids)) == len(words), json.dumps({task: words})
