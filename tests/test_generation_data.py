"""Generation data: bbcnews_headlines, local (source, target) files, bad input, prompt formatting."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from raee.data import TextClassificationDataModule
from raee.generation import LMHead
from raee.run import CONF_DIR


def pairs_file(tmp_path: Path, n: int = 20, edits: dict | None = None) -> Path:
    frame = pd.DataFrame({"article": [f"article number {i} about the weather and the markets" for i in range(n)],
                          "headline": [f"headline {i}" for i in range(n)]})
    for (row, column), value in (edits or {}).items():
        frame.loc[row, column] = value
    path = tmp_path / "pairs.csv"
    frame.to_csv(path, index=False)
    return path


def local(path: Path, **kw) -> TextClassificationDataModule:
    kw = {"text_column": "article", "target_column": "headline", "task_type": "generation", **kw}
    return TextClassificationDataModule("local", file=str(path), **kw)


def test_bbcnews_headlines_split_equals_bbcnews():
    gen = TextClassificationDataModule("bbcnews_headlines", task_type="generation")
    cls = TextClassificationDataModule("bbcnews")
    for split in ("train", "validation", "test"):
        g, c = gen.split(split), cls.split(split)
        assert len(g) == len(c) and g.labels.tolist() == c.labels.tolist()
        # the headline is the file's first line, the source the rest of it
        for i in (0, len(g) // 2, len(g) - 1):
            assert c.texts[i].split("\n", 1)[0].strip()[:12] == g.targets[i][:12]
            assert g.targets[i] not in g.texts[i][:len(g.targets[i])]
    lengths = [len(t.split()) for t in gen.split("train").targets]
    assert max(lengths) <= 9 and 4 < sum(lengths) / len(lengths) < 6.5
    batch = next(iter(gen.test_dataloader()))
    assert set(batch) >= {"text", "target", "index"} and isinstance(batch["target"][0], str)
    assert gen.task_metric == "rougeL"


def test_bbcnews_headlines_config_selects_the_lm_head():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["data=bbcnews_headlines", "exit=full",
                                                       "data.max_eval_examples=5"])
    assert cfg.head._target_ == "raee.generation.LMHead"
    dm = instantiate(cfg.data)
    assert dm.is_generation and dm.max_new_tokens == 20 and len(dm.split("test")) == 5
    head = instantiate(cfg.head)
    assert "{text}" in head.dataset_prompts["generation"]["template"]


def test_local_generation_file(tmp_path):
    dm = local(pairs_file(tmp_path), batch_size=4)
    assert sum(len(dm.split(s)) for s in ("train", "validation", "test")) == 20
    batch = next(iter(dm.train_dataloader()))
    assert all(t.startswith("headline ") for t in batch["target"])


@pytest.mark.parametrize("edits, match", [
    ({(3, "headline"): None}, "target column 'headline' .* 1 missing or empty"),
    ({(4, "headline"): "   "}, "target column 'headline' .* 1 missing or empty"),
    ({(5, "article"): " "}, "source column 'article' .* 1 missing or empty"),
])
def test_empty_target_or_source_is_refused(tmp_path, edits, match):
    with pytest.raises(ValueError, match=match):
        local(pairs_file(tmp_path, edits=edits)).setup()


def test_missing_target_column_is_refused(tmp_path):
    with pytest.raises(ValueError, match="target_column='title' is not a column"):
        local(pairs_file(tmp_path), target_column="title").setup()
    with pytest.raises(ValueError, match="needs data.target_column"):
        local(pairs_file(tmp_path), target_column=None)


@pytest.mark.parametrize("value", [0, -3])
def test_max_new_tokens_must_be_positive(tmp_path, value):
    with pytest.raises(ValueError, match="max_new_tokens"):
        local(pairs_file(tmp_path), max_new_tokens=value)


def test_lm_head_prompts(tiny_backbones):
    bb = tiny_backbones["llama"]
    head = LMHead(template="Article: {text}\nHeadline:", max_source_tokens=3)
    head.bind(bb)
    assert not head.use_chat
    assert head.cut_source("one two three four five") == "one two three"
    ids, n = head.encode_example("one two three four five", "a title")
    assert ids[:n] == head.encode_prompt("one two three four five")
    assert ids[-1] == head.end_id and ids[-1] not in ids[:n]  # the prompt never ends with the end token
    with pytest.raises(ValueError, match="no chat template"):
        LMHead(chat_template=True).bind(bb)
    with pytest.raises(ValueError, match=r"no \{text\} placeholder"):
        LMHead(template="no placeholder").bind(bb)


def test_lm_head_needs_a_decoder_with_lm_head(tiny_backbones):
    from raee.backbones import load_backbone

    encoder = tiny_backbones["bert"]
    with pytest.raises(ValueError, match="bidirectional encoder"):
        LMHead().bind(encoder)
    headless = load_backbone(tiny=dict(model_type="gpt2", n_layer=2, n_embd=16, n_head=2), max_length=32)
    headless.lm_head = None
    with pytest.raises(ValueError, match="no language-model head"):
        LMHead().bind(headless)
