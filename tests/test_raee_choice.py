"""exit=raee_choice: the neighbours' vote as a first-class answer, calibration among head / vote / hybrid, and the
honest cost (keys' FLOPs in backbone layers) it and every run report."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from raee.aggregation import ExitInfo, VotePosterior
from raee.calibration.calibrate import calibrate_on_tables
from raee.calibration.simulate import simulate
from raee.calibration.tables import SplitTables
from raee.cost import cost_summary, layer_flops, layer_shape
from raee.exit_loop import run_early_exit
from raee.exits import BatchContext, KnnExit, RaeeChoiceExit
from raee.exits.raee_choice import NEVER, vote_gates
from raee.experiment import run_experiment
from raee.features import encode_batch
from raee.keys import BackboneKeys, SentenceEncoderKeys, text_mask
from raee.retrieval.torch_exact import TorchExactRetriever
from raee.backbones import load_backbone
from tests.conftest import TINY_CONFIGS, toy_datamodule
from tests.test_calibration import SplitDataModule


# ---------------------------------------------------------------------------- FLOPs by hand


def test_layer_flops_equal_a_hand_count():
    llama = load_backbone(tiny=TINY_CONFIGS["llama"], max_length=32)  # H 32, 4 heads of 8, 2 KV heads, FFN 64, gated
    tokens = torch.tensor([5, 9])
    per_token = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64  # Q, K and V, O, gate/up/down: 9216 multiply-adds
    expected = [2 * (per_token * t + 2 * 32 * t * t) for t in (5, 9)]  # + QK^T and AV over t x t
    assert layer_flops(llama.config, tokens).tolist() == expected == [95360, 176256]
    bert = load_backbone(tiny=TINY_CONFIGS["bert"], max_length=32)  # H 32, 4 heads, FFN 64, not gated
    assert layer_flops(bert.config, torch.tensor([7])).tolist() == [2 * ((4 * 32 * 32 + 2 * 32 * 64) * 7 + 2 * 32 * 49)]
    gemma = layer_shape(load_backbone(tiny=TINY_CONFIGS["gemma3"], max_length=32).config)
    assert (gemma.query_heads, gemma.kv_heads, gemma.head_dim, gemma.gated) == (4, 2, 8, True)


def tiny_sentence_keys(encoder) -> SentenceEncoderKeys:
    """A SentenceEncoderKeys over an already loaded (tiny) encoder, without a model download."""
    keys = SentenceEncoderKeys.__new__(SentenceEncoderKeys)
    keys.name_or_path, keys.pooling, keys.normalize, keys.encoder = "tiny", "mean", True, encoder
    return keys


def test_a_runs_keys_and_layers_cost_what_a_hand_count_says(tmp_path):
    backbone = load_backbone(tiny=TINY_CONFIGS["llama"], max_length=32)
    encoder = load_backbone(tiny=TINY_CONFIGS["bert"], max_length=32)
    dm = toy_datamodule(12, batch_size=4)
    from raee.heads import PrototypeHead

    strategy = KnnExit(tiny_sentence_keys(encoder), TorchExactRetriever(), k=3)
    summary = run_experiment(backbone, PrototypeHead(), strategy, dm, output_dir=tmp_path, cache_dir=tmp_path / "c",
                             progress=False, trainer_kwargs={"enable_progress_bar": False})
    texts = dm.texts
    # by hand: the backbone's tokens (formatted input) and the encoder's (raw text), per example
    backbone_tokens = backbone.tokenize(texts)["attention_mask"].sum(1).tolist()
    encoder_tokens = encoder.tokenize(texts)["attention_mask"].sum(1).tolist()
    one_layer = sum(2 * (9216 * t + 2 * 32 * t * t) for t in backbone_tokens)
    keys = sum(encoder.num_layers * 2 * (8192 * t + 2 * 32 * t * t) for t in encoder_tokens)
    assert summary["layer_flops_per_example"] == pytest.approx(one_layer / len(texts))
    assert summary["key_flops_per_example"] == pytest.approx(keys / len(texts))
    assert summary["key_layer_equivalents"] == pytest.approx(keys / one_layer)
    # kNN runs no layer: its whole cost is its keys plus the measured search and vote
    assert summary["mean_layers_computed"] == 0
    assert summary["cost_layer_equivalents"] == pytest.approx(keys / one_layer + summary["retrieval_layer_equivalents"])
    assert summary["cost_speedup"] == pytest.approx(backbone.num_layers / summary["cost_layer_equivalents"])


def test_retrieval_time_counts_in_layers_of_the_full_models_time():
    results = {"num_examples": 10, "layer_flops": 100.0, "key_flops": 50.0, "mean_layers_computed": 1.5,
               "wall_time_s": 2.0, "timings": {"retrieval_keys": 9.0, "retrieval_search": 0.2, "retrieval_aggregate": 0.3}}
    cost = cost_summary(results, full_wall_time_s=8.0, num_layers=4)  # one layer on one example: 0.2 s
    assert cost["key_layer_equivalents"] == 0.5  # keys count by FLOPs, not by their 9 s
    assert cost["retrieval_layer_equivalents"] == pytest.approx(0.5 / 10 / 0.2)
    assert cost["cost_layer_equivalents"] == pytest.approx(1.5 + 0.5 + 0.25)
    assert cost["wall_per_cost_speedup"] == pytest.approx((8.0 / 2.0) / (4 / 2.25))
    assert cost_summary(results, None, 4)["retrieval_layer_equivalents"] is None


# ---------------------------------------------------------------------------- keys over the text alone


def test_text_pooling_leaves_the_prompt_out():
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0]])
    span = text_mask(mask, 2, 1)
    assert span.tolist() == [[0, 0, 1, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0]]  # last: no text


def test_prompt_head_margins_frame_the_text_on_a_real_tokenizer_shape():
    from raee.heads.prompt import PromptHead

    backbone = load_backbone(tiny=TINY_CONFIGS["gpt2"], max_length=64)
    head = PromptHead(template="Review: {text} Sentiment:", label_words=["bad", "good"])
    head.bind(backbone, ["negative", "positive"])
    keys = BackboneKeys(layer=0, pooling="text")
    keys.bind(backbone, head)
    enc = encode_batch(backbone, head, {"text": ["the film was fine", "awful"], "text_pair": None})
    span = text_mask(enc["attention_mask"], *keys.margins)
    decoded = [backbone.tokenizer.decode(enc["input_ids"][i][span[i].bool()]).strip() for i in range(2)]
    assert decoded == ["the film was fine", "awful"]


# ---------------------------------------------------------------------------- the vote as an answer


@pytest.fixture()
def tiny_setup(tmp_path):
    backbone = load_backbone(tiny=dict(TINY_CONFIGS["bert"], initializer_range=0.2), max_length=64)
    train, validation = toy_datamodule(18), toy_datamodule(12)
    validation.texts = [" ".join(a.split()[: 3 + i % 5] + b.split()[: 6 - i % 4]) for i, (a, b) in
                        enumerate(zip(validation.texts, validation.texts[1:] + validation.texts[:1]))]
    dm = SplitDataModule(train, validation)
    from raee.experiment import prepare_head
    from raee.heads import PrototypeHead

    head = PrototypeHead()
    prepare_head(backbone, head, dm, cache_dir=None, progress=False)
    return backbone, head, dm, tmp_path


def run_on_validation(backbone, head, strategy, dm):
    preds, exits, conf = [], [], []
    for batch in dm.val_dataloader():
        ctx = BatchContext(num_layers=backbone.num_layers, batch_size=len(batch["text"]), texts=list(batch["text"]))
        result = run_early_exit(backbone, head, strategy, encode_batch(backbone, head, batch), ctx)
        preds.append(result.predictions)
        exits.append(result.exit_layers)
        conf.append(result.confidences)
    return torch.cat(preds), torch.cat(exits), torch.cat(conf)


def test_the_vote_answer_equals_exit_knn_when_it_is_always_chosen(tiny_setup):
    backbone, head, dm, cache = tiny_setup
    knn = KnnExit(BackboneKeys(layer=1), TorchExactRetriever(), k=5)
    choice = RaeeChoiceExit(BackboneKeys(layer=1), TorchExactRetriever(), VotePosterior(), k=5, vote_threshold=0.0)
    for strategy in (knn, choice):
        strategy.fit(backbone, head, dm, cache_dir=cache, progress=False)  # the same cached database
        strategy.prepare(backbone, head)
    assert choice.db.directory == knn.db.directory
    knn_preds, knn_exits, knn_conf = run_on_validation(backbone, head, knn, dm)
    preds, exits, conf = run_on_validation(backbone, head, choice, dm)
    assert torch.equal(preds, knn_preds) and torch.equal(exits, knn_exits)
    torch.testing.assert_close(conf, knn_conf)
    assert len(set(knn_preds.tolist())) > 1, "the test needs a vote that varies"


def test_replay_of_the_gated_choice_equals_the_exit_loop(tiny_setup):
    from raee.calibration.tables import compute_tables

    backbone, head, dm, cache = tiny_setup
    # a gate that only unanimous neighbours pass; the hybrid decides the rest, layer by layer
    choice = RaeeChoiceExit(BackboneKeys(layer=1), TorchExactRetriever(), VotePosterior(threshold=0.6), k=3,
                            vote_threshold=0.8)
    choice.fit(backbone, head, dm, cache_dir=cache, progress=False)
    choice.prepare(backbone, head)
    preds, exits, _ = run_on_validation(backbone, head, choice, dm)
    replay = simulate(choice, compute_tables(backbone, head, dm, "validation", retrieval=choice, progress=False))
    assert torch.equal(preds, replay.predictions) and torch.equal(exits, replay.exit_layers)
    assert (exits == 1).any() and (exits > 1).any(), "the test needs votes and later exits"


def test_a_head_alone_setting_does_not_retrieve(tiny_setup):
    backbone, head, dm, cache = tiny_setup
    choice = RaeeChoiceExit(BackboneKeys(layer=0), TorchExactRetriever(), VotePosterior(threshold=NEVER, weight=0.0))
    choice.fit(backbone, head, dm, cache_dir=cache, progress=False)
    choice.prepare(backbone, head)
    batch = next(iter(dm.val_dataloader()))
    ctx = BatchContext(num_layers=backbone.num_layers, batch_size=len(batch["text"]), texts=list(batch["text"]))
    result = run_early_exit(backbone, head, choice, encode_batch(backbone, head, batch), ctx)
    assert not choice.retrieves and "retrieval_search" not in ctx.timings and choice.key_flops(batch["text"]) == 0
    assert result.exit_layers.tolist() == [backbone.num_layers] * len(batch["text"])  # threshold 2: the full model


def vote_right_head_wrong_tables(n: int = 40, num_layers: int = 3, k: int = 5):
    """Validation tables where the head is confidently wrong at every layer and the k neighbours' labels are the
    example's own label (the database holds the labels 0, 1 alternately; example i's neighbours are rows of its
    label)."""
    labels = torch.arange(n) % 2
    logits = torch.zeros(n, num_layers + 1, 2)
    logits[torch.arange(n), :, 1 - labels] = 6.0  # p(wrong class) ~ 0.998 everywhere
    db_labels = torch.arange(2 * k) % 2
    ids = torch.stack([torch.nonzero(db_labels == y).flatten()[:k] for y in labels.tolist()])
    distances = torch.linspace(0.1, 0.5, k).repeat(n, 1)
    width = num_layers + 1
    info = ExitInfo(preds=torch.zeros(2 * k, width, dtype=torch.long), probs=torch.ones(2 * k, width),
                    correct=torch.zeros(2 * k, width, dtype=torch.bool), labels=db_labels)
    return SplitTables(logits=logits, labels=labels, distances=distances, ids=ids), info


def test_calibration_follows_the_vote_when_the_head_is_confidently_wrong():
    tables, info = vote_right_head_wrong_tables()
    choice = RaeeChoiceExit(BackboneKeys(layer=0), TorchExactRetriever(), VotePosterior(), k=5, target="accuracy")
    choice.use_database(SimpleNamespace(info=info, retriever=TorchExactRetriever(), size=info.size))
    choice.num_classes = 2
    result = calibrate_on_tables(choice, tables)
    choice.apply_settings(result["settings"])
    run = simulate(choice, tables)
    assert result["validation"]["full_accuracy"] == 0.0 and result["validation"]["accuracy"] == 1.0
    assert choice.vote_threshold is not None and run.predictions.tolist() == tables.labels.tolist()
    assert run.exit_layers.tolist() == [0] * tables.size  # answered at the key layer, no layer run
    # the same target with the vote left out stays with the (wrong) head: the vote is what rescues it
    head_only = RaeeChoiceExit(BackboneKeys(layer=0), TorchExactRetriever(), VotePosterior(), k=5,
                               families=["head", "hybrid"], target="accuracy")
    head_only.use_database(SimpleNamespace(info=info, retriever=TorchExactRetriever(), size=info.size))
    head_only.num_classes = 2
    assert calibrate_on_tables(head_only, tables)["validation"]["accuracy"] == 0.0


def test_candidates_cover_vote_head_hybrid_and_gates():
    choice = RaeeChoiceExit(BackboneKeys(), TorchExactRetriever(), VotePosterior(weight=2.0), k=12, grid=[0.5, 0.9])
    settings = choice.candidates(num_layers=6, num_classes=2)
    assert vote_gates(12, 2) == pytest.approx([(c - 0.5) / 12 for c in range(7, 13)])
    assert settings[0] == {"vote_threshold": 0.0, "aggregator.weight": 0.0, "aggregator.threshold": NEVER}
    assert len(settings) == 1 + (1 + 6) * 2 * 3  # vote; (no gate + 6 gates) x (head, hybrid) x (0.5, 0.9, never)
    assert {s["aggregator.weight"] for s in settings} == {0.0, 2.0}
    with pytest.raises(ValueError, match="needs a rule with a vote weight"):
        from raee.aggregation import NeighbourVote

        RaeeChoiceExit(BackboneKeys(), TorchExactRetriever(), NeighbourVote())
    with pytest.raises(ValueError, match="exit.families"):
        RaeeChoiceExit(BackboneKeys(), TorchExactRetriever(), VotePosterior(), families=["vote", "oracle"])


# ---------------------------------------------------------------------------- one all-layer pass for every key


def test_cached_layer_logits_and_partial_key_passes_equal_one_full_pass(tiny_setup, tmp_path):
    from raee.calibration.tables import compute_tables, load_or_compute_tables

    backbone, head, dm, _ = tiny_setup
    direct = RaeeChoiceExit(BackboneKeys(layer=2), TorchExactRetriever(), VotePosterior(), k=3)
    direct.fit(backbone, head, dm, cache_dir=None, progress=False)  # no cache: every layer over the training split
    direct.prepare(backbone, head)
    shared = RaeeChoiceExit(BackboneKeys(layer=2), TorchExactRetriever(), VotePosterior(), k=3)
    shared.fit(backbone, head, dm, cache_dir=tmp_path, progress=False)  # train logits cached, keys up to layer 2
    shared.prepare(backbone, head)
    assert (tmp_path / "layer_logits").is_dir()
    for table in ("labels", "preds", "correct"):
        assert torch.equal(getattr(direct.db.info, table)[:], getattr(shared.db.info, table)[:])
    torch.testing.assert_close(direct.db.info.probs[:], shared.db.info.probs[:])
    torch.testing.assert_close(direct.db.keys[:], shared.db.keys[:])
    full = compute_tables(backbone, head, dm, "validation", retrieval=direct, progress=False)
    cached = load_or_compute_tables(backbone, head, dm, "validation", shared, tmp_path, progress=False)
    torch.testing.assert_close(full.logits, cached.logits)
    assert torch.equal(full.ids, cached.ids) and torch.equal(full.index, cached.index)
    torch.testing.assert_close(full.layer_flops, cached.layer_flops)


def test_pooling_auto_is_chosen_by_the_validation_vote(tiny_setup, tmp_path):
    from raee.key_choice import choose_pooling

    backbone, head, dm, _ = tiny_setup
    keys = BackboneKeys(layer=1, pooling="auto")
    result = choose_pooling(keys, backbone, head, dm, k=3, cache_dir=tmp_path, progress=False)
    accuracy = result["validation_accuracy"]
    assert set(accuracy) == {"last", "text", "mean"} and keys.pooling == result["pooling"]
    assert accuracy[keys.pooling] == max(accuracy.values())
    again = BackboneKeys(layer=1, pooling="auto")
    assert choose_pooling(again, backbone, head, dm, k=3, cache_dir=tmp_path, progress=False)["cached"]
    # through a strategy: chosen in fit, before the database, which is built with the chosen pooling
    strategy = KnnExit(BackboneKeys(layer=1, pooling="auto"), TorchExactRetriever(), k=3)
    strategy.fit(backbone, head, dm, cache_dir=tmp_path, progress=False)
    assert strategy.db.meta["key_encoder"]["pooling"] == keys.pooling == strategy.key_choice["pooling"]


def test_a_sweep_process_times_the_full_model_once_when_asked(tmp_path):
    from raee.exits import FixedLayer
    from raee.heads import PrototypeHead

    backbone = load_backbone(tiny=TINY_CONFIGS["bert"], max_length=32)
    dm = toy_datamodule(8)
    runs = [run_experiment(backbone, PrototypeHead(), FixedLayer(layer), dm, output_dir=tmp_path / str(layer),
                           cache_dir=None, progress=False, reuse_full=True,
                           trainer_kwargs={"enable_progress_bar": False}) for layer in (1, 2)]
    assert runs[1]["full_wall_time_s"] == runs[0]["full_wall_time_s"]
    assert runs[0]["full_reference"] == "full" and "timed earlier in this process" in runs[1]["full_reference"]
    other = toy_datamodule(8, batch_size=2)  # another batch size is another reference
    fresh = run_experiment(backbone, PrototypeHead(), FixedLayer(1), other, output_dir=tmp_path / "b", cache_dir=None,
                           progress=False, reuse_full=True, trainer_kwargs={"enable_progress_bar": False})
    assert fresh["full_reference"] == "full"
