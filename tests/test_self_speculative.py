"""Self-speculative decoding: the output equals the full model's token for token over many random prompts and draft
settings (every acceptance pattern: none, some, all), equals transformers' own assisted generation with
``assistant_early_exit``, stops where full stops, reuses the draft's layers (never recomputes them), and counts
FLOPs as the decoding loop does."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from raee.errors import UserError
from raee.generation import FullGeneration
from raee.generation.speculative import SelfSpeculativeGeneration, acceptance_summary, resolve_draft_layer
from raee.generation.strategies import generation_methods
from tests.test_generation_decode import hf_lm, run

pytestmark = pytest.mark.usefixtures("single_thread")

DECODERS = ["llama", "gemma3", "gpt2"]


def random_prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 30000) for _ in range(rng.randrange(1, 14))] for _ in range(n)]


def damp_upper_layers(bb, draft_layer: int, scale: float):
    """A copy whose layers above ``draft_layer`` write ``scale`` x their usual update into the residual stream:
    scale 0 makes the layer-E read-out equal the full model's (every draft accepted), small scales accept some."""
    bb = copy.deepcopy(bb)
    for module in bb.layer_modules()[draft_layer:]:
        for name, p in module.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "c_proj.weight")) and p.dim() == 2:
                p.data.mul_(scale)
    return bb


def speculative(bb, prompts, n, draft_layer, draft_tokens, **kw):
    strategy = SelfSpeculativeGeneration(draft_layer=draft_layer, draft_tokens=draft_tokens)
    return run(bb, strategy, prompts, n, **kw), strategy


@pytest.mark.parametrize("family", DECODERS)
def test_equals_full_token_for_token_over_random_prompts_and_draft_settings(tiny_backbones, family):
    bb = tiny_backbones[family]
    L = bb.num_layers
    accepted_patterns = set()
    for seed, scale in enumerate([1.0, 0.3, 0.0]):  # random upper layers: few drafts agree; damped: some; off: all
        for draft_layer in range(1, L):
            model = damp_upper_layers(bb, draft_layer, scale)
            prompts = random_prompts(6, seed=100 * seed + draft_layer)
            full = run(model, FullGeneration(), prompts, 12)
            for draft_tokens in (1, 2, 3, 5):
                out, _ = speculative(model, prompts, 12, draft_layer, draft_tokens)
                assert out.tokens == full.tokens, (scale, draft_layer, draft_tokens)
                assert out.exit_layers == [[L] * len(t) for t in out.tokens]
                rate = acceptance_summary(out.stats)["acceptance_rate"]
                accepted_patterns.add("none" if rate == 0 else "all" if rate == 1 else "some")
                if scale == 0.0:
                    assert rate == 1.0  # the layer-E read-out is the full model's: every draft is kept
    assert {"some", "all"} <= accepted_patterns


def test_equals_transformers_assisted_generation_with_early_exit(tiny_backbones):
    """transformers' own self-speculative decoding (generate(assistant_early_exit=E), Llama family only) gives the
    same tokens: both are the full model's greedy output."""
    bb = damp_upper_layers(tiny_backbones["llama"], 1, 0.3)
    lm = hf_lm(bb)
    for prompt in random_prompts(4, seed=7):
        ids = torch.tensor([prompt])
        theirs = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                             eos_token_id=None, pad_token_id=0, assistant_early_exit=1, num_assistant_tokens=3,
                             num_assistant_tokens_schedule="constant")[0, len(prompt):].tolist()
        ours, _ = speculative(bb, [prompt], 10, 1, 3)
        assert ours.tokens[0] == theirs


def test_stops_where_full_stops_and_respects_max_new_tokens(tiny_backbones):
    bb = damp_upper_layers(tiny_backbones["llama"], 1, 0.0)
    prompts = random_prompts(8, seed=3)
    free = run(bb, FullGeneration(), prompts, 16)
    # end on a token the model writes often, and break lines on another: rows stop at different points
    counts = torch.bincount(torch.tensor([t for row in free.tokens for t in row]))
    end, newline = counts.argsort(descending=True)[:2].tolist()
    full = run(bb, FullGeneration(), prompts, 16, end_ids=[end], newline_ids={newline})
    assert any(len(t) < 16 for t in full.tokens)
    for draft_tokens in (1, 4, 8):
        out, _ = speculative(bb, prompts, 16, 1, draft_tokens, end_ids=[end], newline_ids={newline})
        assert out.tokens == full.tokens
    short, _ = speculative(bb, prompts, 3, 1, 8)
    assert all(len(t) == 3 for t in short.tokens) and short.tokens == run(bb, FullGeneration(), prompts, 3).tokens


def test_the_verification_reuses_the_drafts_early_layers(tiny_backbones):
    """Layers 1..E run once per token (the draft's keys and values are reused by the verification), layers E+1..L
    once per verified token: count the token-rows each layer's key projection sees."""
    bb = damp_upper_layers(tiny_backbones["llama"], 1, 0.0)  # every draft accepted: no rejected token
    seen = [0] * bb.num_layers
    hooks = [m.self_attn.k_proj.register_forward_hook(
        lambda mod, inp, out, i=i: seen.__setitem__(i, seen[i] + inp[0].shape[-2])) for i, m in
        enumerate(bb.layer_modules())]
    try:
        prompt = random_prompts(1, seed=11)[0]
        out, _ = speculative(bb, [prompt], 13, 1, 4)
    finally:
        for h in hooks:
            h.remove()
    fed = len(prompt) + len(out.tokens[0]) - 1  # the last output token is never fed, as in full decoding
    assert seen == [fed] * bb.num_layers


def test_flops_and_acceptance_are_counted_like_the_decoding_loop(tiny_backbones):
    bb = damp_upper_layers(tiny_backbones["llama"], 2, 0.0)
    prompts = random_prompts(3, seed=5)
    full = run(bb, FullGeneration(), prompts, 12)
    out, strategy = speculative(bb, prompts, 12, 2, 3)
    assert out.tokens == full.tokens
    f, s = full.flops, out.flops
    # the full model's count covers the same tokens, phase by phase
    assert s.tokens == f.tokens and s.full_macs == f.full_macs
    assert s.macs["prefill"] == f.macs["prefill"]
    assert s.macs["decode"] > f.macs["decode"]  # extra LM-head reads (the drafts'), nothing skipped
    stats = acceptance_summary(out.stats)
    assert stats["acceptance_rate"] == 1.0
    # 3 drafts + the verifier's token per round, fewer in a row's last round (max_new_tokens)
    assert 3 < stats["tokens_per_round"] == (out.stats["accepted"] + out.stats["rounds"]) / out.stats["rounds"] <= 4
    assert out.stats["accepted"] == out.stats["drafted"] > 0
    assert strategy.knobs() == {"draft_layer": 2, "draft_tokens": 3}


def test_draft_layer_as_a_fraction_and_bad_settings():
    assert resolve_draft_layer(0.25, 30) == 8 and resolve_draft_layer(8, 30) == 8
    assert resolve_draft_layer(0.01, 30) == 1 and resolve_draft_layer(0.99, 30) == 29
    with pytest.raises(UserError, match="layer 1..29"):
        resolve_draft_layer(30, 30)
    with pytest.raises(UserError, match="draft_layer"):
        resolve_draft_layer("x", 30)
    with pytest.raises(UserError, match="draft_tokens"):
        SelfSpeculativeGeneration(draft_tokens=0)
    with pytest.raises(UserError, match="2 layers or more"):
        SelfSpeculativeGeneration().validate(1)
    assert "self_speculative" in generation_methods()


def test_a_run_reports_identical_output_acceptance_and_flops(tiny_backbones, tmp_path):
    import json

    import pandas as pd
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from raee.data import TextClassificationDataModule
    from raee.generation import LMHead
    from raee.generation.experiment import format_generation_summary, run_generation_experiment
    from raee.run import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["data=bbcnews_headlines", "exit=self_speculative",
                                                       "exit.draft_layer=2", "exit.draft_tokens=3"])
    strategy = instantiate(cfg.exit)
    assert isinstance(strategy, SelfSpeculativeGeneration) and strategy.draft_tokens == 3
    frame = pd.DataFrame({"article": [f"article {i} on the markets and the weather" for i in range(30)],
                          "headline": [f"markets {i}" for i in range(30)]})
    frame.to_csv(tmp_path / "pairs.csv", index=False)
    dm = TextClassificationDataModule("local", file=str(tmp_path / "pairs.csv"), text_column="article",
                                      target_column="headline", task_type="generation", max_new_tokens=8,
                                      eval_batch_size=2)
    bb = damp_upper_layers(tiny_backbones["llama"], 2, 0.2)
    summary = run_generation_experiment(bb, LMHead(), strategy, dm, output_dir=tmp_path / "run", progress=False)
    assert summary["method"] == "self_speculative" and summary["knobs"] == {"draft_layer": 2, "draft_tokens": 3}
    assert summary["rougeL"] == summary["full_rougeL"] and summary["mean_generated_tokens"] == summary[
        "full_mean_generated_tokens"]
    assert 0 < summary["acceptance_rate"] <= 1 and summary["tokens_per_round"] >= 1
    assert summary["flops_speedup"] < 1 and summary["mean_exit_layer"] == bb.num_layers
    assert summary["same_as_full"] == summary["num_examples"] and summary["same_as_full_share"] == 1.0
    assert "drafts accepted" in format_generation_summary(summary)
    assert f"the same text as the full model: {summary['num_examples']} of {summary['num_examples']}" in \
        format_generation_summary(summary)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["acceptance_rate"] == summary["acceptance_rate"]


def test_a_draft_vocabulary_changes_the_cost_never_the_output(tiny_backbones, tmp_path):
    bb = damp_upper_layers(tiny_backbones["llama"], 2, 0.0)
    prompts = random_prompts(4, seed=21)
    full = run(bb, FullGeneration(), prompts, 10)
    plain, _ = speculative(bb, prompts, 10, 2, 3)
    written = sorted({t for row in full.tokens for t in row})
    covered = SelfSpeculativeGeneration(draft_layer=2, draft_tokens=3, draft_vocab=len(written))
    covered.use_draft_vocab(written)
    narrow = run(bb, covered, prompts, 10)
    assert narrow.tokens == full.tokens and acceptance_summary(narrow.stats)["acceptance_rate"] == 1.0
    assert narrow.flops.macs["decode"] < plain.flops.macs["decode"]  # the drafts read fewer LM-head rows
    assert covered.knobs() == {"draft_layer": 2, "draft_tokens": 3, "draft_vocab": len(written)}
    elsewhere = SelfSpeculativeGeneration(draft_layer=2, draft_tokens=3, draft_vocab=2)
    elsewhere.use_draft_vocab([t for t in range(5, 40) if t not in written][:2])
    missed = run(bb, elsewhere, prompts, 10)
    assert missed.tokens == full.tokens and acceptance_summary(missed.stats)["acceptance_rate"] == 0.0
    with pytest.raises(RuntimeError, match="fit"):
        run(bb, SelfSpeculativeGeneration(draft_layer=2, draft_vocab=5), prompts, 3)
    with pytest.raises(UserError, match="draft_vocab"):
        SelfSpeculativeGeneration(draft_vocab=0)


def test_fit_builds_the_draft_vocabulary_from_the_training_targets(tiny_backbones, tmp_path):
    import pandas as pd

    from raee.data import TextClassificationDataModule
    from raee.generation import LMHead

    frame = pd.DataFrame({"article": [f"article {i} on the markets" for i in range(20)],
                          "headline": ["markets fall" if i % 2 else "markets rise again" for i in range(20)]})
    frame.to_csv(tmp_path / "pairs.csv", index=False)
    dm = TextClassificationDataModule("local", file=str(tmp_path / "pairs.csv"), text_column="article",
                                      target_column="headline", task_type="generation")
    bb = tiny_backbones["llama"]
    head = LMHead()
    head.bind(bb, dm)
    strategy = SelfSpeculativeGeneration(draft_layer=1, draft_vocab=2)
    strategy.fit(bb, head, dm)
    markets = head.encode_target("markets")[:-1]
    assert len(markets) == 1  # one token, in every target, as often as the end token: those two lead
    assert set(strategy.draft_ids.tolist()) == {markets[0], head.end_id} | head.end_ids
