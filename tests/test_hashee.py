"""HashEE: hashes are deterministic and cover the layers; a token past its exit layer is frozen
while [CLS] keeps changing; with every token active the layer equals the model's own; FLOPs
fall only when tokens exit; fine-tuning saves and reloads to identical predictions."""

from __future__ import annotations

import copy

import pytest
import torch

from raee.backbones.base import LayerState
from raee.exit_loop import run_early_exit
from raee.exits import BatchContext
from raee.hashee import (HashEEExit, cluster_hash, count_token_labels, count_tokens, forward_with_token_exits,
                         frequency_hash, mutual_information_hash, occurrence_random_layers, random_hash,
                         run_token_exit_layer, token_exit_flops, token_exit_macs)
from raee.hashee.token_layer import layer_parts
from raee.heads import LinearHead, PrototypeHead
from tests.conftest import TEXTS, toy_datamodule

SPECIAL = [0, 3, 7]


def all_hashes(vocab_size: int, num_layers: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 50, (vocab_size,), generator=g)
    joint = torch.randint(0, 20, (vocab_size, 3), generator=g)
    emb = torch.randn(vocab_size, 8, generator=g)
    return {"random": random_hash(vocab_size, num_layers, seed=5, special_ids=SPECIAL),
            "frequency": frequency_hash(counts, num_layers, SPECIAL),
            "mi": mutual_information_hash(joint, num_layers, SPECIAL, class_counts=torch.tensor([5, 3, 2])),
            "cluster": cluster_hash(emb, num_layers, seed=5, special_ids=SPECIAL)}


# ---------------------------------------------------------------------------- hashes
def test_hashes_are_deterministic_in_range_and_use_every_layer():
    first, again = all_hashes(200, 4), all_hashes(200, 4)
    for name, m in first.items():
        assert m.dtype == torch.long and m.shape == (200,), name
        assert torch.equal(m, again[name]), f"{name} hash is not deterministic"
        assert int(m.min()) >= 1 and int(m.max()) <= 4, name
        assert set(m.tolist()) == {1, 2, 3, 4}, f"{name} hash leaves a layer unused"
        assert m[SPECIAL].tolist() == [4, 4, 4], f"{name} hash lets a special token exit early"


def test_random_hash_depends_on_seed_and_balances_layers():
    a, b = random_hash(1000, 5, seed=1), random_hash(1000, 5, seed=2)
    assert not torch.equal(a, b)
    assert torch.bincount(a, minlength=6)[1:].tolist() == [200] * 5


def test_occurrence_hash_is_seeded_and_differs_per_occurrence():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 500, (8, 40), generator=g)
    ids[:, 5] = 77  # one type at one position in every text, and ids[0] repeats it along the text
    ids[0, 10:30] = 77
    ids[:, 0] = 3  # a special token ([CLS]) first
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # padding
    first = occurrence_random_layers(ids, mask, 6, seed=1, special_ids=[3])
    assert torch.equal(first, occurrence_random_layers(ids, mask, 6, seed=1, special_ids=[3]))  # seeded
    assert not torch.equal(first, occurrence_random_layers(ids, mask, 6, seed=2, special_ids=[3]))
    assert first.min() >= 1 and first.max() <= 6 and (first[:, 0] == 6).all() and (first[1, 30:] == 6).all()
    assert len(set(first[0, 10:30].tolist())) >= 4, "one type must get different layers at different positions"
    assert len(set(first[:, 5].tolist())) >= 3, "one type at one position must differ between texts"
    real = first[mask.bool() & (ids != 3)]
    assert set(real.tolist()) == {1, 2, 3, 4, 5, 6}
    # a text's layers do not depend on its batch: alone, unpadded, it gets the same assignment
    alone = occurrence_random_layers(ids[1:2, :30], mask[1:2, :30], 6, seed=1, special_ids=[3])
    assert torch.equal(alone[0], first[1, :30])


def test_frequency_hash_most_frequent_first_unseen_and_special_last():
    counts = torch.tensor([100, 0, 50, 40, 30, 20, 10, 5, 4, 0, 1000])  # id 10 is special, ids 1 and 9 unseen
    m = frequency_hash(counts, num_layers=4, special_ids=[10])
    # seen types by frequency: 0, 2, 3, 4, 5, 6, 7, 8 -> 4 buckets of 2 distinct types
    assert m[[0, 2]].tolist() == [1, 1]
    assert m[[3, 4]].tolist() == [2, 2]
    assert m[[5, 6]].tolist() == [3, 3]
    assert m[[7, 8]].tolist() == [4, 4]
    assert m[[1, 9, 10]].tolist() == [4, 4, 4]


def test_mi_hash_ranks_label_specific_tokens_first():
    # token 0 occurs only in class 0, token 1 only in class 2, token 2 evenly everywhere, token 3 mostly class 1
    joint = torch.tensor([[30, 0, 0], [0, 0, 30], [10, 10, 10], [2, 20, 8], [0, 0, 0]])
    m = mutual_information_hash(joint, num_layers=2, class_counts=torch.tensor([10, 10, 10]))
    assert m[[0, 1]].tolist() == [1, 1]  # the two most informative
    assert m[[2, 3]].tolist() == [2, 2]
    assert m[4] == 2  # unseen -> last layer


def test_cluster_hash_orders_clusters_by_summed_norm():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4) * torch.tensor([[4.0], [1.0], [3.0], [2.0]])  # 4 directions, 4 norms
    emb = (centres.repeat_interleave(10, 0) + 0.01 * torch.randn(40, 4, generator=g))
    m = cluster_hash(emb, num_layers=4, seed=0)
    expected = torch.tensor([4, 1, 3, 2]).repeat_interleave(10)  # smallest summed norm exits first
    assert torch.equal(m, expected)


def test_counting_follows_the_tokenizer(tiny_bert):
    tok = tiny_bert.tokenizer
    texts = ["the cat saw the dog", "the end"]
    counts = count_tokens(tok, texts)
    the = tok.convert_tokens_to_ids("the")
    assert counts.shape == (len(tok),)
    assert counts[the] == 3 and counts[tok.cls_token_id] == 2 and counts[tok.pad_token_id] == 0
    joint, classes = count_token_labels(tok, texts, [1, 0], num_classes=2)
    assert joint[the].tolist() == [1, 2] and classes.tolist() == [1, 1]
    with pytest.raises(ValueError, match="regression"):
        count_token_labels(tok, texts, [0.5, 1.5], num_classes=2)


# ---------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_all_tokens_active_equals_the_ordinary_layer(tiny_backbones, family):
    bb = tiny_backbones[family]
    enc = bb.tokenize(TEXTS)  # padded batch
    state = bb.embed(**enc)
    real = state.attention_mask.bool()
    every = torch.full_like(state.input_ids, bb.num_layers)
    for layer in range(1, bb.num_layers + 1):
        ours = run_token_exit_layer(bb, layer, state, every)
        state = bb.run_layer(state)
        torch.testing.assert_close(ours[real], state.hidden[real], atol=1e-5, rtol=1e-5)


def test_active_tokens_match_the_ordinary_layer_and_frozen_ones_are_copied(tiny_bert):
    enc = tiny_bert.tokenize(TEXTS)
    state = tiny_bert.run_layer(tiny_bert.embed(**enc))  # layer 1, a generic input state
    token_exit = torch.randint(1, 5, state.input_ids.shape, generator=torch.Generator().manual_seed(0))
    token_exit[:, 0] = 4
    ours = run_token_exit_layer(tiny_bert, 2, state, token_exit)
    ref = tiny_bert.run_layer(state).hidden
    real = state.attention_mask.bool()
    active = real & (token_exit >= 2)
    assert active.any() and (real & ~active).any()
    # same input state: an active token sees the same keys/values as in the ordinary layer
    torch.testing.assert_close(ours[active], ref[active], atol=1e-5, rtol=1e-5)
    assert torch.equal(ours[~active], state.hidden[~active])


def test_exited_token_is_frozen_while_cls_keeps_changing(tiny_bert):
    tok = tiny_bert.tokenizer
    L = tiny_bert.num_layers
    token_to_layer = torch.full((tiny_bert.model.get_input_embeddings().num_embeddings,), L)
    token_to_layer[tok.convert_tokens_to_ids("match")] = 1
    token_to_layer[tok.convert_tokens_to_ids("draw")] = 2
    enc = tiny_bert.tokenize(TEXTS[:1])
    ids = enc["input_ids"][0].tolist()
    match, draw = ids.index(tok.convert_tokens_to_ids("match")), ids.index(tok.convert_tokens_to_ids("draw"))
    state = tiny_bert.embed(**enc)
    exits = token_to_layer[state.input_ids]
    hidden = [state.hidden]
    for layer in range(1, L + 1):
        state = LayerState(run_token_exit_layer(tiny_bert, layer, state, exits), state.attention_mask,
                           state.input_ids, layer)
        hidden.append(state.hidden)
    for layer in range(1, L + 1):
        assert not torch.allclose(hidden[layer][0, 0], hidden[layer - 1][0, 0]), f"[CLS] frozen at layer {layer}"
    assert not torch.allclose(hidden[1][0, match], hidden[0][0, match])  # updated by its exit layer 1
    assert all(torch.equal(hidden[l][0, match], hidden[1][0, match]) for l in range(2, L + 1))
    assert not torch.allclose(hidden[2][0, draw], hidden[1][0, draw])  # exit layer 2: still updated by layer 2
    assert all(torch.equal(hidden[l][0, draw], hidden[2][0, draw]) for l in range(3, L + 1))


def test_exited_tokens_are_never_computed_nor_changed(tiny_bert):
    """Count the rows each layer's query and feed-forward projections see: exactly the active tokens;
    and an exited token's state stays bitwise equal to its state at its exit layer."""
    enc = tiny_bert.tokenize(TEXTS)
    token_to_layer = random_hash(tiny_bert.model.get_input_embeddings().num_embeddings, tiny_bert.num_layers,
                                 seed=4, special_ids=tiny_bert.tokenizer.all_special_ids)
    rows: dict[tuple[int, str], int] = {}
    handles = []
    for layer, module in enumerate(tiny_bert.layer_modules(), start=1):
        parts = layer_parts(module)
        for name, linear in (("query", parts.query), ("ffn", parts.ffn_in)):
            def count(mod, args, out, key=(layer, name)):
                rows[key] = rows.get(key, 0) + args[0].shape[0]
            handles.append(linear.register_forward_hook(count))
    try:
        state = tiny_bert.embed(**enc)
        exits = token_to_layer[state.input_ids]
        real = state.attention_mask.bool()
        states = [state.hidden]
        for layer in range(1, tiny_bert.num_layers + 1):
            state = LayerState(run_token_exit_layer(tiny_bert, layer, state, exits), state.attention_mask,
                               state.input_ids, layer)
            states.append(state.hidden)
    finally:
        for h in handles:
            h.remove()
    for layer in range(1, tiny_bert.num_layers + 1):
        active = int((real & (exits >= layer)).sum())
        assert rows[(layer, "query")] == rows[(layer, "ffn")] == active, f"layer {layer} computed exited tokens"
    assert rows[(tiny_bert.num_layers, "query")] < int(real.sum())  # exits did remove work
    for b, t in torch.nonzero(real).tolist():
        e = int(exits[b, t])
        for later in range(e + 1, tiny_bert.num_layers + 1):
            assert torch.equal(states[later][b, t], states[e][b, t]), f"token ({b}, {t}) changed after its exit"


def test_padding_does_not_change_results(tiny_bert):
    token_to_layer = random_hash(tiny_bert.model.get_input_embeddings().num_embeddings, tiny_bert.num_layers,
                                 seed=3, special_ids=tiny_bert.tokenizer.all_special_ids)
    short = TEXTS[2]
    alone = forward_with_token_exits(tiny_bert, tiny_bert.tokenize([short]), token_to_layer)
    batch = forward_with_token_exits(tiny_bert, tiny_bert.tokenize([TEXTS[3], short]), token_to_layer)
    n = alone.hidden.shape[1]
    assert batch.hidden.shape[1] > n  # the short text is padded in the batch
    torch.testing.assert_close(batch.hidden[1, :n], alone.hidden[0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- FLOPs
def test_flops_count_matches_the_formula():
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    active = torch.tensor([[1, 0, 1, 0, 1], [1, 1, 0, 0, 0]])  # padding is never counted as active
    H, I = 8, 16
    full = sum(4 * n * H * H + 2 * n * n * H + 2 * n * H * I for n in (4, 2))
    assert token_exit_macs(mask, None, H, I) == full
    # example 0: n=4 real, a=2 active; example 1: n=2, a=2
    part = sum(2 * n * H * H + 2 * a * H * H + 2 * a * n * H + 2 * a * H * I for n, a in ((4, 2), (2, 2)))
    assert token_exit_macs(mask, active, H, I) == part
    assert token_exit_flops(mask, active, H, I) == 2 * part


def _bound_head(backbone, pooling: str = "cls") -> LinearHead:
    torch.manual_seed(0)
    head = LinearHead(pooling=pooling)
    head.bind(backbone, ["a", "b", "c"])
    head.eval()
    return head


def test_exit_loop_end_to_end_and_flops_speedup(tiny_bert):
    L = tiny_bert.num_layers
    V = tiny_bert.model.get_input_embeddings().num_embeddings
    head = _bound_head(tiny_bert, pooling="mean")
    enc = tiny_bert.tokenize(TEXTS)
    ctx = BatchContext(num_layers=L, batch_size=len(TEXTS), texts=TEXTS)

    none_exit = HashEEExit(hash="random")
    none_exit.use_token_map(torch.full((V,), L))
    none_exit.prepare(tiny_bert, head)
    full = run_early_exit(tiny_bert, head, none_exit, enc, ctx)
    assert none_exit.flops_speedup() == pytest.approx(1.0)
    torch.testing.assert_close(full.logits, head(tiny_bert.all_layers(**enc)[-1]), atol=1e-5, rtol=1e-5)

    strategy = HashEEExit(hash="random")
    token_to_layer = random_hash(V, L, seed=0, special_ids=tiny_bert.tokenizer.all_special_ids)
    strategy.use_token_map(token_to_layer)
    strategy.prepare(tiny_bert, head)
    assert strategy.flops_speedup() is None
    tiny_bert.reset_counters()
    res = run_early_exit(tiny_bert, head, strategy, enc, ctx)
    assert res.exit_layers.tolist() == [L] * len(TEXTS)  # the classification token runs every layer
    assert tiny_bert.layer_examples == [0] + [len(TEXTS)] * L
    expected = head(forward_with_token_exits(tiny_bert, enc, token_to_layer))
    torch.testing.assert_close(res.logits, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(res.logits, full.logits)  # exits change the result
    speedup = strategy.flops_speedup()
    assert speedup > 1.0
    run_early_exit(tiny_bert, head, strategy, enc, ctx)  # accumulates over batches: same ratio
    assert strategy.flops_speedup() == pytest.approx(speedup)
    strategy.reset_flops()
    assert strategy.flops_speedup() is None


def test_wall_clock_reference_runs_every_token_through_the_token_path(tiny_bert, monkeypatch):
    """HashEE is timed against its own packed layer code with nothing exiting (the transformers layer also
    computes padding), except on unpadded batches; that reference gives the full model's predictions."""
    from raee.exits import FullModel
    from raee.hashee import strategy as strategy_module

    L = tiny_bert.num_layers
    head = _bound_head(tiny_bert, pooling="mean")
    enc = tiny_bert.tokenize(TEXTS)
    assert not enc["attention_mask"].bool().all()  # padded: where the two layer codes differ in cost
    ctx = BatchContext(num_layers=L, batch_size=len(TEXTS), texts=TEXTS)
    reference = HashEEExit(hash="random").wall_clock_reference()
    assert reference.name == "full (token path)"

    layers, original = [], strategy_module.run_token_exit_layer

    def spy(backbone, layer, state, token_exit):
        layers.append(layer)
        assert bool((token_exit[state.attention_mask.bool()] >= layer).all())  # no token frozen
        return original(backbone, layer, state, token_exit)

    monkeypatch.setattr(strategy_module, "run_token_exit_layer", spy)
    reference.prepare(tiny_bert, head)
    ref = run_early_exit(tiny_bert, head, reference, enc, ctx)
    assert layers == list(range(1, L + 1))
    full = run_early_exit(tiny_bert, head, FullModel(), enc, ctx)
    torch.testing.assert_close(ref.logits, full.logits, atol=1e-5, rtol=1e-5)
    assert ref.exit_layers.tolist() == full.exit_layers.tolist() == [L] * len(TEXTS)

    # without padding the packing would skip nothing: the model's own (faster) layer runs
    layers.clear()
    one = tiny_bert.tokenize(TEXTS[:1])
    single = run_early_exit(tiny_bert, head, reference, one, BatchContext(num_layers=L, batch_size=1, texts=TEXTS[:1]))
    assert layers == []
    torch.testing.assert_close(single.logits, ref.logits[:1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- fine-tuning
def _predict(backbone, head, strategy, dm) -> torch.Tensor:
    strategy.prepare(backbone, head)
    out = []
    for batch in dm.test_dataloader():
        enc = backbone.tokenize(list(batch["text"]))
        ctx = BatchContext(num_layers=backbone.num_layers, batch_size=len(batch["text"]), texts=list(batch["text"]))
        out.append(run_early_exit(backbone, head, strategy, enc, ctx).logits)
    return torch.cat(out)


def test_finetuning_saves_and_reloads_to_identical_predictions(tiny_backbones, tmp_path, monkeypatch):
    dm = toy_datamodule(n=8, batch_size=4)
    backbone = copy.deepcopy(tiny_backbones["bert"])  # fine-tuning changes it: leave the shared one alone
    head = _bound_head(backbone)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    classifier_before = head.classifiers[4].weight.clone()
    strategy = HashEEExit(hash="frequency", max_epochs=1, lr=1e-3)
    strategy.fit(backbone, head, dm, cache_dir=tmp_path, progress=False)
    assert not strategy.loaded and strategy.checkpoint_dir.parent == tmp_path / "hashee"
    assert {p.name for p in strategy.checkpoint_dir.iterdir()} >= {"meta.json", "token_to_layer.safetensors",
                                                                   "backbone.safetensors", "classifiers.safetensors"}
    changed = [k for k, v in backbone.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("encoder.layer" in k for k in changed), "fine-tuning did not update the backbone"
    assert not torch.equal(head.classifiers[4].weight, classifier_before)
    assert not any(p.requires_grad for p in backbone.parameters()) and not backbone.model.training
    # the most frequent non-special token of the training texts exits after layer 1
    counts = count_tokens(backbone.tokenizer, dm.texts, vocab_size=len(strategy.token_to_layer))
    counts[backbone.tokenizer.all_special_ids] = 0
    assert strategy.token_to_layer[int(counts.argmax())] == 1
    assert strategy.token_to_layer[backbone.tokenizer.cls_token_id] == backbone.num_layers
    first = _predict(backbone, head, strategy, dm)

    # a fresh model from the same cache: reloaded, not trained again
    import raee.hashee.training as training

    monkeypatch.setattr(training, "finetune_with_token_exits",
                        lambda *a, **k: pytest.fail("the checkpoint should have been reloaded"))
    backbone2 = copy.deepcopy(tiny_backbones["bert"])  # the weights from before fine-tuning
    head2 = LinearHead(pooling="cls")
    head2.bind(backbone2, ["a", "b", "c"])
    head2.eval()
    again = HashEEExit(hash="frequency", max_epochs=1, lr=1e-3)
    again.fit(backbone2, head2, dm, cache_dir=tmp_path, progress=False)
    assert again.loaded and again.checkpoint_dir == strategy.checkpoint_dir
    assert torch.equal(again.token_to_layer, strategy.token_to_layer)
    assert torch.equal(_predict(backbone2, head2, again, dm), first)


def test_checkpoint_for_other_classes_is_refused(tiny_bert, tmp_path):
    dm = toy_datamodule(n=6, batch_size=3)
    backbone = tiny_bert  # max_epochs=0: hash only, the weights are not touched
    strategy = HashEEExit(hash="random", max_epochs=0, checkpoint=str(tmp_path / "ck"))
    strategy.fit(backbone, _bound_head(backbone), dm, progress=False)
    other = LinearHead()
    other.bind(backbone, ["x", "y"])
    with pytest.raises(ValueError, match="classes"):
        HashEEExit(hash="random", checkpoint=str(tmp_path / "ck")).fit(backbone, other, dm, progress=False)


# ---------------------------------------------------------------------------- bad input
def test_num_layers_mismatch_is_refused(tiny_bert):
    with pytest.raises(ValueError, match=r"num_layers=6.*4 layers"):
        HashEEExit(num_layers=6).validate(tiny_bert.num_layers)
    HashEEExit(num_layers=4).validate(tiny_bert.num_layers)


def test_head_without_classifiers_is_refused(tiny_bert):
    head = PrototypeHead()
    head.bind(tiny_bert, ["a", "b", "c"])
    with pytest.raises(ValueError, match="head=linear"):
        HashEEExit().fit(tiny_bert, head, toy_datamodule(n=6), progress=False)


@pytest.mark.parametrize("hash_name", ["random", "frequency", "mi", "cluster", "random_occurrence"])
def test_last_layer_spreads_hashed_tokens_below_it_while_special_and_unseen_tokens_run_every_layer(tiny_bert,
                                                                                                   hash_name):
    L = tiny_bert.num_layers
    assert L >= 3, "the tiny model needs room below its last layer"
    dm = toy_datamodule(n=12)
    strategy = HashEEExit(hash=hash_name, first_layer=1, last_layer=2, max_epochs=0, seed=3)
    strategy._layers = L
    token_map = strategy.build_token_map(tiny_bert, _bound_head(tiny_bert), dm, progress=False)
    tok = tiny_bert.tokenizer
    enc = tok(list(dm.texts), padding=True, return_tensors="pt")
    if token_map is None:  # per occurrence
        strategy.use_occurrence_hash(tok.all_special_ids)
    else:
        strategy.use_token_map(token_map)
    layers = strategy.assign(enc["input_ids"], enc["attention_mask"])
    special = torch.isin(enc["input_ids"], torch.tensor(tok.all_special_ids))
    real = enc["attention_mask"].bool() & ~special
    assert set(layers[real].unique().tolist()) <= {1, 2}, "hashed tokens exit at layers 1..last_layer"
    assert (layers[special] == L).all(), "[CLS], [SEP] and padding run every layer"
    if hash_name in ("frequency", "mi"):
        seen = set(enc["input_ids"].flatten().tolist())
        unseen = [i for i in range(len(token_map)) if i not in seen and i not in tok.all_special_ids]
        assert unseen and (token_map[unseen] == L).all(), "tokens unseen in training run every layer, as in the paper"
    # the default (last_layer = L) keeps the old map and cache key
    default = HashEEExit(hash=hash_name, last_layer=None, max_epochs=0, seed=3)
    assert "last_layer" not in default.training_settings()
    assert strategy.training_settings()["last_layer"] == 2
    with pytest.raises(ValueError, match="last_layer=1 is below exit.first_layer=2"):
        HashEEExit(first_layer=2, last_layer=1)
    with pytest.raises(ValueError, match="above the backbone"):
        HashEEExit(last_layer=L + 1).validate(L)


@pytest.mark.parametrize(("fraction", "num_layers", "layer"), [(0.67, 6, 4), (0.67, 12, 8), (0.67, 2, 1),
                                                             (0.5, 6, 3), (0.1, 6, 1), (0.99, 6, 6)])
def test_last_layer_as_a_fraction_of_L_resolves_to_the_nearest_layer_and_shares_its_cache_key(fraction, num_layers,
                                                                                               layer):
    strategy = HashEEExit(hash="random", last_layer=fraction, max_epochs=0)
    assert strategy._last(num_layers) == layer
    strategy.validate(num_layers)
    assert strategy.last_layer == layer
    absolute = HashEEExit(hash="random", last_layer=layer, max_epochs=0)
    absolute.validate(num_layers)
    # the fine-tune's cache key holds the resolved layer: 0.67 of 6 reuses a last_layer=4 checkpoint
    assert strategy.training_settings() == absolute.training_settings()
    assert strategy.knobs() == {**absolute.knobs(), "last_layer_fraction": fraction}


def test_last_layer_fraction_stays_within_first_layer_and_hash_none_ignores_it():
    strategy = HashEEExit(hash="random", first_layer=3, last_layer=0.2)
    strategy.validate(6)
    assert strategy.last_layer == 3, "round(0.2 * 6) = 1 is below first_layer: clamped to it"
    # the reference exits nothing: its cache key does not depend on last_layer
    assert HashEEExit(hash="none", last_layer=0.67).training_settings() == \
        HashEEExit(hash="none", last_layer=None).training_settings()
    for bad in (0.0, 1.5, -2, 0, True, "4"):
        with pytest.raises(ValueError, match="last_layer"):
            HashEEExit(last_layer=bad)
    assert HashEEExit(last_layer=1.0).last_layer == 1, "1.0 is layer 1, not the whole depth"


def test_bad_settings_and_missing_map_are_refused(tiny_backbones, tiny_bert):
    with pytest.raises(ValueError, match="choose one of"):
        HashEEExit(hash="sha256")
    with pytest.raises(RuntimeError, match="fit"):
        HashEEExit().prepare(tiny_bert, _bound_head(tiny_bert))
    gpt2 = tiny_backbones["gpt2"]
    with pytest.raises(ValueError, match="encoder"):
        HashEEExit().fit(gpt2, _bound_head(gpt2), toy_datamodule(n=6), progress=False)
