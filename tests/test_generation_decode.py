"""The decoding loop: equal to transformers' generate, exits that change nothing, state propagation, the
teacher-forced form, FLOPs, and the strategies' rules (tiny random decoders)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from raee.backbones import load_backbone
from raee.generation import ConfidenceGeneration, FixedGeneration, FullGeneration, HashEEGeneration, forward_with_exits
from raee.generation.layers import decoder_ops
from raee.hashee.strategy import HashEEExit
from tests.conftest import TINY_CONFIGS

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny decoding: one thread (conftest)

DECODERS = ["llama", "gemma3", "gpt2"]
# prompts of different lengths (batched: left padding); longer than the tiny Gemma-3's window of 4
PROMPTS = [[101, 2023, 2003, 1037, 3231, 1997], [101, 7592, 2088], [101, *range(2000, 2012)]]


def hf_lm(bb):
    """The HF causal LM around the backbone's own modules (same weights)."""
    lm = AutoModelForCausalLM.from_config(bb.model.config)
    setattr(lm, lm.base_model_prefix, bb.model)
    lm.lm_head = bb.lm_head
    return lm.eval()


def hf_greedy(lm, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
    return out[0, len(prompt):].tolist()


def run(bb, strategy, prompts=PROMPTS, n: int = 10, end_ids=(), newline_ids=None):
    strategy.prepare(bb, None)
    return strategy.generate(bb, prompts, n, set(end_ids), newline_ids)


def hashee(bb, token_to_layer: torch.Tensor, tokens: str = "all") -> HashEEGeneration:
    s = HashEEGeneration(HashEEExit(hash="random", last_layer=None, max_epochs=0, tokens=tokens))
    s.use_token_map(token_to_layer)
    return s


def random_map(bb, seed: int = 0) -> torch.Tensor:
    vocab = int(bb.model.get_input_embeddings().weight.shape[0])
    return torch.randint(1, bb.num_layers + 1, (vocab,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def decoders(tiny_backbones):
    return {name: tiny_backbones[name] for name in DECODERS}


@pytest.mark.parametrize("family", DECODERS)
def test_full_greedy_equals_transformers_generate(decoders, family):
    bb = decoders[family]
    lm = hf_lm(bb)
    out = run(bb, FullGeneration(), n=12)
    for prompt, tokens, layers in zip(PROMPTS, out.tokens, out.exit_layers):
        assert tokens == hf_greedy(lm, prompt, 12)
        assert layers == [bb.num_layers] * 12
    # batched (left padding, rows of different lengths) equals one prompt at a time
    assert [run(bb, FullGeneration(), [p], n=12).tokens[0] for p in PROMPTS] == out.tokens


@pytest.mark.parametrize("family", DECODERS)
def test_exits_at_the_last_layer_change_nothing(decoders, family):
    bb = decoders[family]
    full = run(bb, FullGeneration())
    fixed = run(bb, FixedGeneration(bb.num_layers))
    vocab = int(bb.model.get_input_embeddings().weight.shape[0])
    at_l = run(bb, hashee(bb, torch.full((vocab,), bb.num_layers)))
    never = run(bb, ConfidenceGeneration(threshold=1.0))  # a softmax gap never reaches 1 on these models
    for other in (fixed, at_l, never):
        assert other.tokens == full.tokens and other.exit_layers == full.exit_layers
    assert fixed.flops.summary()["flops_speedup"] == pytest.approx(1.0)


def test_hash_none_equals_full(decoders):
    bb = decoders["gemma3"]
    none = HashEEGeneration(HashEEExit(hash="none", max_epochs=0))
    none.prepare(bb, None)  # the map of hash=none needs no data: every token runs all L layers
    assert run(bb, none).tokens == run(bb, FullGeneration()).tokens


def test_fixed_layer_is_a_shallower_model(decoders):
    """exit=fixed at l: every token, prompt and generated, leaves at l; no layer above l ever runs."""
    bb = decoders["llama"]
    out = run(bb, FixedGeneration(2))
    assert all(layer == 2 for row in out.exit_layers for layer in row)
    assert all(layer == 2 for row in out.prompt_exit_layers for layer in row)
    s = FixedGeneration(2)
    run(bb, s)
    assert s._decoder.cache.filled[3] == 0 and s._decoder.cache.filled[2] > 0  # layer 3 never ran
    # the same tokens as the HF model cut after 2 layers
    cut = load_backbone(tiny=TINY_CONFIGS["llama"], max_length=64)
    cut.model.layers = cut.model.layers[:2]
    cut.model.config.num_hidden_layers = 2
    cut._num_layers = None
    assert run(cut, FullGeneration()).tokens == out.tokens


@pytest.mark.parametrize("family", DECODERS)
def test_keys_values_of_copied_states_equal_the_model_layer(decoders, family):
    """A token that left at e: its keys and values at layers above e, computed from its copied state, equal what the
    model's own attention layer computes from that state (and the teacher-forced states equal the decode's)."""
    bb = decoders[family]
    s = hashee(bb, random_map(bb, seed=1))
    prompt = PROMPTS[2]
    out = run(bb, s, [prompt], n=8)
    cache = s._decoder.cache
    ids = torch.tensor([prompt + out.tokens[0][:-1]])  # every token that was run (the last one never is)
    mask = torch.ones_like(ids)
    reads = torch.zeros_like(ids, dtype=torch.bool)
    reads[0, len(prompt) - 1:] = True
    exits = s.token_exits(ids, mask, reads)
    assert exits[0, len(prompt):].tolist() == out.exit_layers[0][1:]
    final, layers = forward_with_exits(bb, ids, mask, exits, return_layers=True)
    T = ids.shape[1]
    torch.testing.assert_close(final, cache.top[:, :T], atol=1e-5, rtol=1e-5)
    ops = decoder_ops(bb)
    positions = torch.arange(T).unsqueeze(0)
    rotary = ops.rotary(layers[0], positions)
    checked = 0
    for layer in range(1, bb.num_layers + 1):
        columns = min(cache.filled[layer], T)
        hf_cache = DynamicCache()  # plain layers keep every key (a sliding-window layer keeps its window only)
        module = bb.layer_modules()[layer - 1]
        kwargs = dict(cache=hf_cache, use_cache=True, position_ids=positions)
        if family != "gpt2":
            kwargs["position_embeddings"] = ops.layer_rotary(rotary, layer)
        with torch.no_grad():
            module(layers[layer - 1], **kwargs)
        hf_keys, hf_values = hf_cache.layers[layer - 1].keys, hf_cache.layers[layer - 1].values
        torch.testing.assert_close(cache.keys[layer][:, :, :columns], hf_keys[:, :, :columns], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.values[layer][:, :, :columns], hf_values[:, :, :columns], atol=1e-5, rtol=1e-5)
        checked += int((exits[0, :columns] < layer).sum())
    assert checked > 0  # some keys/values did come from copied states


@pytest.mark.parametrize("family", DECODERS)
def test_teacher_forced_forward_equals_the_incremental_decode(decoders, family):
    bb = decoders[family]
    s = hashee(bb, random_map(bb, seed=2))
    out = run(bb, s, n=8)
    for prompt, tokens in zip(PROMPTS, out.tokens):
        ids = torch.tensor([prompt + tokens])
        reads = torch.zeros_like(ids, dtype=torch.bool)
        reads[0, len(prompt) - 1:] = True
        exits = s.token_exits(ids, torch.ones_like(ids), reads)
        hidden = forward_with_exits(bb, ids, torch.ones_like(ids), exits)
        predicted = bb.lm_logits(hidden[0, len(prompt) - 1:-1]).argmax(-1).tolist()
        assert predicted == tokens
    # right padding and a batch give the same states as one row at a time
    ids = torch.zeros(2, 13, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(PROMPTS[1:]):
        ids[i, :len(p)], mask[i, :len(p)] = torch.tensor(p), 1
    exits = s.token_exits(ids, mask, torch.zeros_like(ids, dtype=torch.bool))
    batched = forward_with_exits(bb, ids, mask, exits)
    for i, p in enumerate(PROMPTS[1:]):
        alone = forward_with_exits(bb, ids[i:i + 1, :len(p)], mask[i:i + 1, :len(p)], exits[i:i + 1, :len(p)])
        torch.testing.assert_close(batched[i:i + 1, :len(p)], alone, atol=1e-5, rtol=1e-5)


def test_teacher_forced_forward_keeps_gradients(decoders):
    bb = decoders["llama"]
    ids = torch.tensor([PROMPTS[0]])
    bb.requires_grad_(True)
    try:
        hidden = forward_with_exits(bb, ids, torch.ones_like(ids), torch.tensor([[1, 3, 2, 3, 1, 2]]))
        bb.lm_logits(hidden).logsumexp(-1).sum().backward()
        grads = [p.grad for p in bb.layer_modules()[2].parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
    finally:
        bb.requires_grad_(False)
        bb.zero_grad(set_to_none=True)


def test_hashee_exits_and_their_flops(decoders):
    bb = decoders["gpt2"]
    token_map = random_map(bb, seed=3)
    s = hashee(bb, token_map)
    out = run(bb, s, n=6)
    for prompt, tokens, layers, prompt_layers in zip(PROMPTS, out.tokens, out.exit_layers, out.prompt_exit_layers):
        assert prompt_layers == token_map[prompt].tolist()
        # the token read at step t is the one the step ran: the last prompt token, then each generated one
        assert layers == token_map[[prompt[-1], *tokens[:-1]]].tolist()
    summary = out.flops.summary()
    assert summary["flops_speedup"] > 1 and summary["prefill_flops_speedup"] > 1
    only_prompt = run(bb, hashee(bb, token_map, tokens="prompt"), n=6)
    assert all(layer == bb.num_layers for row in only_prompt.exit_layers for layer in row)
    assert only_prompt.prompt_exit_layers[0][:-1] == token_map[PROMPTS[0][:-1]].tolist()
    assert only_prompt.prompt_exit_layers[0][-1] == bb.num_layers


def test_flops_of_the_full_model_count_every_product(decoders):
    """GPT-2, one prompt: FLOPs = 2 x (keys/values, queries, attention over position + 1 keys, output, feed-forward,
    and one LM-head read per generated token)."""
    bb = decoders["gpt2"]
    prompt, n = PROMPTS[0], 4
    out = run(bb, FullGeneration(), [prompt], n=n)
    H, L, V, I = 32, 3, 30522, 128
    per_layer = lambda pos: 2 * H * H + H * H + 2 * H * (pos + 1) + H * H + 2 * H * I  # noqa: E731
    T = len(prompt)
    prefill = sum(L * per_layer(p) for p in range(T)) + V * H
    decode = sum(L * per_layer(p) + V * H for p in range(T, T + n - 1))  # the last token is never run
    flops = out.flops
    assert flops.macs == {"prefill": prefill, "decode": decode} and flops.full_macs == flops.macs
    assert flops.tokens == {"prefill": T, "decode": n - 1}


@pytest.mark.parametrize("measure", ["softmax", "saturation"])
def test_confidence_exits(decoders, measure):
    bb = decoders["llama"]
    eager = run(bb, ConfidenceGeneration(threshold=0.0, measure=measure, min_layer=1))
    first = 1 if measure == "softmax" else 2  # saturation compares two checked layers
    assert all(layer == first for row in eager.exit_layers for layer in row)
    for row in eager.prompt_exit_layers:  # prompt tokens run every layer, but the last one: its output is read
        assert row[:-1] == [bb.num_layers] * (len(row) - 1) and row[-1] == first
    # a token that left at the first layer is the LM head's argmax there: the same as a fixed exit for the read token
    strict = run(bb, ConfidenceGeneration(threshold=0.0, measure="softmax", min_layer=2, every=5))
    assert all(layer == 2 for row in strict.exit_layers for layer in row)
    summary = eager.flops.summary()
    assert summary["decode_flops_speedup"] is not None and summary["head_reads"]["decode"] > 0


def test_end_and_newline_tokens_stop_a_row(decoders):
    bb = decoders["llama"]
    free = run(bb, FullGeneration(), [PROMPTS[0]], n=10).tokens[0]
    stop = free[3]
    out = run(bb, FullGeneration(), [PROMPTS[0]], n=10, end_ids={stop})
    assert out.tokens[0] == free[:free.index(stop) + 1]
    # a line break stops a row only once it has written something else
    lines = run(bb, FullGeneration(), [PROMPTS[0]], n=10, newline_ids={free[0], free[2]})
    assert lines.tokens[0] == free[:3] if free[1] != free[0] else len(lines.tokens[0]) <= 3
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        run(bb, FullGeneration(), n=0)


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_full_greedy_equals_transformers_generate_on_articles():
    """The layerwise loop's greedy headlines on real BBC articles (chat-template prompts) equal generate's."""
    from raee.data import TextClassificationDataModule
    from raee.generation import LMHead

    bb = load_backbone("smollm2")
    dm = TextClassificationDataModule("bbcnews_headlines", task_type="generation", max_source_tokens=48,
                                      prompt={"generation": {"message": "Write a headline.\n\n{text}"}})
    head = LMHead()
    head.bind(bb, dm)
    assert head.use_chat
    lm = hf_lm(bb)
    prompts = [head.encode_prompt(text) for text in dm.split("validation").texts[:3]]
    out = run(bb, FullGeneration(), prompts, n=8)
    for prompt, tokens in zip(prompts, out.tokens):
        assert tokens == hf_greedy(lm, prompt, 8)


@pytest.mark.real_lm
def test_gemma3_270m_full_greedy_equals_transformers_generate():
    """Gemma-3-270M (<bos>, a 262k vocabulary, local and global rotary tables): the layerwise loop equals generate
    (its 512-token window is exercised by the tiny Gemma-3's window of 4); a HashEE plan decodes on it."""
    bb = load_backbone("gemma3_270m")
    lm = hf_lm(bb)
    ids = bb.tokenizer("Article: The central bank raised interest rates again on Thursday, the third rise this "
                       "year, citing inflation.\nHeadline:")["input_ids"]
    out = run(bb, FullGeneration(), [ids], n=8)
    assert out.tokens[0] == hf_greedy(lm, ids, 8)
    s = hashee(bb, random_map(bb, seed=4))
    assert len(run(bb, s, [ids], n=4).tokens[0]) == 4


def test_the_base_strategy_lets_no_token_leave_early():
    from raee.generation.strategies import GenerationExit

    base = GenerationExit()
    assert not base.should_exit(3, torch.randn(4, 11)).any()
    assert base.should_exit(3, None, hidden=torch.randn(2, 8)).shape == (2,)
