"""Benchmark (not a test): load time and per-example forward time of the packaged causal LMs.

For each backbone, prints the load time (a first load de-quantises the GGUF once into the
per-user cache: tens of seconds to minutes; later loads read that copy), and the time of one
all-layer forward pass at batch size 1 on a Rotten Tomatoes snippet and an IMDB review (median
of ``--repeats`` runs after a warm-up), with the token counts.

    python experiments/benchmark_lm_backbones.py                       # smollm2 and gemma3_270m
    python experiments/benchmark_lm_backbones.py --backbones smollm2 --repeats 10 --max-length 256

``--fresh-cache DIR`` points ``$RAEE_CACHE`` at DIR/ for this run, so the first load converts
(the packaged GGUF files are then fetched again unless ``$RAEE_ASSETS`` holds them).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from raee.backbones import load_backbone
from raee.cli import user_errors
from raee.data.sources import load_imdb, load_rotten_tomatoes


def sample_texts(seed: int) -> dict[str, str]:
    """One Rotten Tomatoes snippet and one IMDB review of typical (median) length."""
    out = {}
    for name, loader in (("rotten_tomatoes", load_rotten_tomatoes), ("imdb", load_imdb)):
        frame = loader().frames["train"]
        lengths = frame["text"].str.len()
        typical = frame[(lengths - lengths.median()).abs() <= lengths.std() / 10]
        out[name] = typical.sample(1, random_state=seed)["text"].iloc[0]
    return out


@torch.no_grad()
def forward_seconds(backbone, text: str, repeats: int) -> tuple[float, int]:
    """Median seconds of an all-layer forward pass of ``text`` (batch 1), and its token count."""
    enc = backbone.tokenize([text])
    backbone.all_layers(**enc)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        backbone.all_layers(**enc)
        times.append(time.perf_counter() - start)
    return statistics.median(times), int(enc["input_ids"].shape[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["smollm2", "gemma3_270m"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=128, help="tokens kept per input (the configs' default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--fresh-cache", default=None, help="use this directory as $RAEE_CACHE (first load converts)")
    args = parser.parse_args()
    if args.fresh_cache:
        os.environ["RAEE_CACHE"] = args.fresh_cache
    if args.threads:
        torch.set_num_threads(args.threads)
    texts = sample_texts(args.seed)
    print(f"torch threads: {torch.get_num_threads()}; max_length {args.max_length}; median of {args.repeats} runs")
    for name in args.backbones:
        start = time.perf_counter()
        backbone = load_backbone(name, max_length=args.max_length)
        load = time.perf_counter() - start
        print(f"{name}: {backbone.num_layers} layers, loaded in {load:.1f} s")
        for source, text in texts.items():
            seconds, tokens = forward_seconds(backbone, text, args.repeats)
            print(f"  {source:16s} {tokens:4d} tokens: {seconds * 1000:7.1f} ms per example (all layers, batch 1)")
        del backbone


if __name__ == "__main__":
    with user_errors():  # a user's error: one paragraph, exit status 2
        main()
