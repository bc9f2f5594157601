"""What every layer of a generation model predicts, teacher-forced on reference headlines (not a test).

    OMP_NUM_THREADS=1 python experiments/generation_layer_agreement.py paths.cache_dir=/work/cache \\
        --examples 40 --weights zero_shot joint hashee hashee_none --targets reference generated \\
        --csv results/generation_layers/agreement.csv

For the first N articles of ``--split`` (default validation) of ``+experiment=compare_generation`` (SmolLM2,
data=bbcnews_headlines, its budget; any Hydra override is added), every article's prompt + target headline runs
through all L layers, and at every position that predicts a headline token the LM head is read at each layer
l = 1..L (the final norm + LM head, as the joint loss, confidence exits and self-speculative drafts read it).
Per layer:

- ``agreement``: share of positions whose top-1 at layer l is the top-1 at layer L of the same weights (what a
  self-speculative draft from layer l and a confidence exit at l rely on);
- ``ce``: mean cross-entropy of the target tokens (nats; log V = 10.8 for a uniform guess over SmolLM2's
  49,152 types), and ``accuracy``: share of positions whose top-1 is the target token.

Targets (``--targets``, column ``targets``): ``reference``, the reference headline and the end token; ``generated``,
the same weights' own greedy output (exit=full, the project's decoding loop), the tokens a self-speculative draft
is verified against: there ``agreement`` at layer E is the share of first draft tokens from layer E that the
verification would accept (with the whole vocabulary as draft rows).

Weight sets (``--weights``): ``zero_shot`` (the backbone as loaded), ``joint`` (the shared fine-tune,
head.finetune=joint), ``hashee`` (HashEE's own fine-tune, exit=hashee) and ``hashee_none`` (its no-exit reference,
exit.hash=none). Fine-tunes are LOADED from the project's content-keyed cache (``paths.cache_dir``), never trained:
a missing entry stops the script with its directory. With ``--hash-exits`` (default on) every weight set gets one
more row (``exits=hash``): the same positions read with HashEE's token exits in place (exit=hashee's hash: every
token leaves at its hash layer and its state is copied above, as HashEE's fine-tune and decoding compute it), each
prediction read at its token's exit layer; ``layer`` is then the mean exit layer of the read positions.

Prints one line per weight set and layer, and writes them to ``--csv``.
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any
from unittest import mock

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from raee.cli import user_errors  # noqa: E402
from raee.errors import UserError  # noqa: E402

#: weight set -> the overrides that select it on top of +experiment=compare_generation
WEIGHT_SETS = {
    "zero_shot": ["exit=full", "head.finetune=null"],
    "joint": ["exit=full", "head.finetune=joint"],
    "hashee": ["exit=hashee"],
    "hashee_none": ["exit=hashee", "exit.hash=none"],
}
#: the CSV's columns
COLUMNS = ("weights", "targets", "exits", "layer", "num_layers", "positions", "agreement", "ce", "accuracy", "finetune_key")
#: the exit strategy whose hash gives the ``exits=hash`` rows
HASH_OVERRIDES = ["exit=hashee"]


def compose_cfg(overrides: Sequence[str]) -> Any:
    from raee.run import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@contextmanager
def cached_finetunes_only() -> Iterator[None]:
    """Load generation fine-tunes from their cache entries; a missing entry is an error instead of a fine-tune."""
    from raee.generation import finetune as finetune_module

    def load_only(target: Any, build: Any, load: Any, **_: Any) -> Any:
        target = Path(target)
        if not target.exists():
            raise UserError(f"the fine-tune these settings ask for is not cached ({target} does not exist): this "
                            "script never trains. Run the experiment that builds it first (+experiment="
                            "compare_generation), or give paths.cache_dir where it was built")
        return load(target)

    with mock.patch.object(finetune_module, "load_or_build", load_only):
        yield


def prepare_weights(overrides: Sequence[str], *, train: bool = False) -> tuple[Any, Any, Any, Any, Any]:
    """(cfg, backbone, LM head, generation strategy, data module) of one weight set, its fine-tune in place (from
    the cache; ``train``: build it when missing, tests only)."""
    from raee.generation.experiment import prepare_generation
    from raee.run import build_objects

    cfg = compose_cfg(overrides)
    objects = build_objects(cfg)
    datamodule = objects["datamodule"]
    datamodule.setup("test")
    with cached_finetunes_only() if not train else nullcontext():
        head, generator = prepare_generation(objects["backbone"], objects["head"], objects["strategy"], datamodule,
                                             cache_dir=cfg.paths.cache_dir, progress=False)
    return cfg, objects["backbone"], head, generator, datamodule


def hash_strategy(overrides: Sequence[str], backbone: Any, head: Any) -> Any:
    """exit=hashee's generation strategy with its token map built for ``backbone`` (no fine-tune)."""
    from hydra.utils import instantiate

    from raee.generation.strategies import for_generation

    strategy = for_generation(instantiate(compose_cfg(overrides).exit))
    strategy.prepare(backbone, head)
    return strategy


class LayerTally:
    """Sums over positions, per layer: agreement with layer L, cross-entropy, accuracy."""

    def __init__(self, num_layers: int) -> None:
        self.agree = torch.zeros(num_layers)
        self.ce = torch.zeros(num_layers, dtype=torch.float64)
        self.correct = torch.zeros(num_layers)
        self.positions = 0

    def add(self, layer_logits: Sequence[torch.Tensor], labels: torch.Tensor, final_top1: torch.Tensor) -> None:
        """layer_logits: one (N, V) tensor per row of the tally; labels, final_top1: (N,)."""
        for i, logits in enumerate(layer_logits):
            top1 = logits.argmax(-1)
            self.agree[i] += float((top1 == final_top1).sum())
            self.correct[i] += float((top1 == labels).sum())
            self.ce[i] += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        self.positions += int(labels.numel())

    def row(self, i: int) -> dict[str, float]:
        n = max(1, self.positions)
        return {"positions": self.positions, "agreement": float(self.agree[i]) / n, "ce": float(self.ce[i]) / n,
                "accuracy": float(self.correct[i]) / n}


@torch.no_grad()
def layer_agreement(backbone: Any, encoded: Sequence[tuple[list[int], list[int]]], *, batch_size: int = 8,
                    hash_exits: Any = None, progress: bool = True, label: str = "") -> list[dict[str, Any]]:
    """Rows (layer 1..L, then one ``exits=hash`` row when ``hash_exits`` is a HashEE strategy) of the LM head's
    readings at every layer, teacher-forced on ``encoded`` (prompt ids, target ids) pairs; see the module
    docstring."""
    from raee.generation.lm_losses import prediction_positions
    from raee.generation.step import forward_with_exits
    from raee.generation.trainer import collate_pairs, reads_of

    L = backbone.num_layers
    pad_id = backbone.tokenizer.pad_token_id if backbone.tokenizer.pad_token_id is not None else 0
    tally, hashed = LayerTally(L), LayerTally(1)
    exit_layers = 0.0
    started = time.perf_counter()
    for lo in range(0, len(encoded), batch_size):
        batch = collate_pairs(encoded[lo:lo + batch_size], pad_id)
        ids, mask, target = (batch[k].to(backbone.device) for k in ("input_ids", "attention_mask", "target_mask"))
        positions, labels = prediction_positions(target, ids)
        rows, cols = positions[:, 0], positions[:, 1]
        states = backbone.all_layers(ids, mask)
        logits = [backbone.lm_logits(states[layer].hidden[rows, cols]) for layer in range(1, L + 1)]
        final_top1 = logits[-1].argmax(-1)
        tally.add(logits, labels, final_top1)
        del states, logits
        if hash_exits is not None:
            exits = hash_exits.token_exits(ids, mask, reads_of(target))
            hidden = forward_with_exits(backbone, ids, mask, exits)
            hashed.add([backbone.lm_logits(hidden[rows, cols])], labels, final_top1)
            exit_layers += float(exits[rows, cols].float().sum())
        if progress:
            done = min(len(encoded), lo + batch_size)
            print(f"  {label} {done}/{len(encoded)} articles, {tally.positions} headline positions, "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    out = [{"exits": "none", "layer": layer, "num_layers": L, **tally.row(layer - 1)} for layer in range(1, L + 1)]
    if hash_exits is not None:
        out.append({"exits": "hash", "layer": exit_layers / max(1, hashed.positions), "num_layers": L,
                    **hashed.row(0)})
    return out


def reference_targets(head: Any, datamodule: Any, split: str, examples: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference ids + the end token) of the first ``examples`` articles of ``split``, encoded as the
    fine-tunes see them (:meth:`raee.generation.LMHead.encode_example`)."""
    data = datamodule.split(split)
    if data.targets is None:
        raise UserError("the data is not a generation task: use data=bbcnews_headlines (the default here) or "
                        "data.task_type=generation with data.target_column")
    encoded = []
    for source, target in zip(data.texts[:examples], data.targets[:examples]):
        ids, prompt_len = head.encode_example(source, target)
        encoded.append((ids[:prompt_len], ids[prompt_len:]))
    return encoded


def generated_targets(backbone: Any, head: Any, datamodule: Any, split: str, examples: int
                      ) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, the full model's own greedy output ids) of the first ``examples`` articles of ``split``: the
    tokens a self-speculative draft is verified against (the project's decoding loop, exit=full)."""
    from raee.generation.evaluate import decode_split
    from raee.generation.strategies import FullGeneration

    if split not in ("validation", "test"):
        raise UserError(f"--targets generated decodes --split {split}: use validation or test")
    full = FullGeneration()
    full.prepare(backbone, head)
    run = decode_split(backbone, head, full, datamodule, split, warmup_batches=0, max_examples=examples,
                       progress=False)
    texts = datamodule.split(split).texts
    return [(head.encode_prompt(texts[r["index"]]), list(r["tokens"])) for r in run.rows if r["tokens"]]


TARGETS = ("reference", "generated")


def run(weights: Sequence[str], overrides: Sequence[str], *, split: str = "validation", examples: int = 40,
        batch_size: int = 8, hash_exits: bool = True, experiment: str | None = "compare_generation",
        targets: Sequence[str] = ("reference",), train: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """The rows of every weight set in ``weights`` (names of :data:`WEIGHT_SETS`), each on a freshly loaded
    backbone (a fine-tune's cache key depends on the weights it starts from)."""
    unknown = [w for w in weights if w not in WEIGHT_SETS]
    if unknown:
        raise UserError(f"--weights {' '.join(unknown)}: choose among {', '.join(WEIGHT_SETS)}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise UserError(f"--targets {' '.join(unknown)}: choose among {', '.join(TARGETS)}")
    base = ([f"+experiment={experiment}"] if experiment else []) + [f"data.max_eval_examples={examples}"]
    rows: list[dict[str, Any]] = []
    for name in weights:
        started = time.perf_counter()
        cfg, backbone, head, generator, datamodule = prepare_weights([*base, *WEIGHT_SETS[name], *overrides],
                                                                      train=train)
        budget = head.budget() or generator.budget() or {}
        key = Path(budget["cache"]).name if budget.get("cache") else ""
        if progress:
            print(f"{name}: {backbone.name}, {backbone.num_layers} layers, weights "
                  f"{('fine-tune ' + key + (' (loaded)' if budget.get('loaded') else ' (trained now)')) if key else 'as loaded'}"
                  f" [{time.perf_counter() - started:.0f} s]", flush=True)
        hasher = (hash_strategy([*base, *HASH_OVERRIDES, *overrides], backbone, head) if hash_exits else None)
        for kind in targets:
            started = time.perf_counter()
            encoded = (reference_targets(head, datamodule, split, examples) if kind == "reference"
                       else generated_targets(backbone, head, datamodule, split, examples))
            if progress:
                print(f"  {name}: {len(encoded)} {kind} targets, {sum(len(t) for _, t in encoded)} tokens "
                      f"[{time.perf_counter() - started:.0f} s]", flush=True)
            found = layer_agreement(backbone, encoded, batch_size=batch_size, hash_exits=hasher, progress=progress,
                                    label=f"{name} ({kind})")
            rows += [{"weights": name, "targets": kind, **r, "finetune_key": key} for r in found]
        del cfg, backbone, head, generator, datamodule, hasher
        gc.collect()
    return rows


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'weights':<12} {'targets':<9} {'exits':<5} {'layer':>6} {'positions':>9} {'agreement':>9} {'CE (nats)':>9} "
             f"{'accuracy':>8}"]
    for r in rows:
        layer = f"{r['layer']:.2f}" if r["exits"] == "hash" else str(r["layer"])
        lines.append(f"{r['weights']:<12} {r['targets']:<9} {r['exits']:<5} {layer:>6} {r['positions']:>9} {r['agreement']:>9.3f} "
                     f"{r['ce']:>9.3f} {r['accuracy']:>8.3f}")
    return "\n".join(lines)


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    from raee.atomic import atomic_write_text

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), buf.getvalue())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. paths.cache_dir=/work/cache")
    parser.add_argument("--weights", nargs="+", default=["zero_shot", "joint", "hashee"], help=", ".join(WEIGHT_SETS))
    parser.add_argument("--targets", nargs="+", default=["reference", "generated"], choices=list(TARGETS),
                        help="teacher-force the reference headlines and / or the full model's own greedy output")
    parser.add_argument("--split", default="validation", choices=["train", "validation", "test"])
    parser.add_argument("--examples", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-hash-exits", dest="hash_exits", action="store_false",
                        help="skip the rows read with HashEE's token exits in place")
    parser.add_argument("--experiment", default="compare_generation", help="the +experiment= base ('' = none)")
    parser.add_argument("--csv", default=None, help="write the rows to this CSV file")
    args = parser.parse_args(argv)
    with user_errors():
        if args.examples < 1:
            raise UserError(f"--examples {args.examples}: give at least 1 article")
        print(f"load average at start: {os.getloadavg()}  threads: {torch.get_num_threads()}", flush=True)
        rows = run(args.weights, args.overrides, split=args.split, examples=args.examples,
                   batch_size=args.batch_size, hash_exits=args.hash_exits, experiment=args.experiment or None,
                   targets=args.targets)
        print(format_rows(rows))
        print(f"load average at end: {os.getloadavg()}", flush=True)
        if args.csv:
            write_csv(args.csv, rows)
            print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
