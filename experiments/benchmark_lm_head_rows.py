"""Benchmark (not a test): the prompt head's LM-head cost per layer, whole vocabulary vs label rows.

At every layer the prompt head reads one position per example through the final norm and the LM
head. Computing the whole vocabulary and keeping the label words' columns costs V x H per example;
:meth:`LayerwiseBackbone.lm_logits` with ``token_ids`` computes only the C label rows. This times
both on random weights of the real shapes (time depends on shapes only) and puts them beside one
transformer layer of the same model on a batch of short prompts, all in one process after a warm-up.

    python experiments/benchmark_lm_head_rows.py                  # SmolLM2 and Gemma-3-270M shapes
    python experiments/benchmark_lm_head_rows.py --batch 32 --tokens 40 --repeats 30
    python experiments/benchmark_lm_head_rows.py --clock cpu    # one thread, CPU time: steadier on a busy machine
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from raee.backbones.lm_head import LMHeadRows

#: name -> (vocabulary rows V, hidden size H, Llama-style layer sizes for the per-layer reference)
SHAPES = {
    "SmolLM2-135M": dict(vocab=49_152, hidden=576, intermediate=1536, heads=9, kv_heads=3),
    "Gemma-3-270M": dict(vocab=262_144, hidden=640, intermediate=2048, heads=4, kv_heads=1),
}


CLOCK = time.perf_counter  # or time.thread_time (--clock cpu, with one torch thread)


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = CLOCK()
        fn()
        times.append(CLOCK() - start)
    return 1000 * statistics.median(times)


@torch.no_grad()
def bench(name: str, shape: dict, batch: int, tokens: int, labels: int, repeats: int) -> dict:
    torch.manual_seed(0)
    head = LMHeadRows(torch.nn.Linear(shape["hidden"], shape["vocab"], bias=False))
    ids = torch.randint(0, shape["vocab"], (labels,))
    hidden = torch.randn(batch, shape["hidden"])
    full = median_ms(lambda: head(hidden)[:, ids], repeats)
    rows = median_ms(lambda: head(hidden, ids), repeats)
    torch.testing.assert_close(head(hidden, ids), head(hidden)[:, ids], atol=1e-4, rtol=1e-4)
    # one Llama-style layer on the batch (head_dim = hidden / heads), for scale
    config = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                         num_hidden_layers=1, vocab_size=8)
    config._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(config, 0).eval()
    states = torch.randn(batch, tokens, shape["hidden"])
    positions = torch.arange(tokens).unsqueeze(0)
    rotary = LlamaRotaryEmbedding(config)(states, position_ids=positions)
    one_layer = median_ms(lambda: layer(states, attention_mask=None, position_embeddings=rotary,
                                        position_ids=positions), repeats)
    return {"model": name, "full_ms": full, "rows_ms": rows, "layer_ms": one_layer,
            "saved_ms": full - rows, "saved_share_of_layer": (full - rows) / one_layer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="examples per batch (one read position each)")
    parser.add_argument("--tokens", type=int, default=40, help="prompt length for the per-layer reference")
    parser.add_argument("--labels", type=int, default=2, help="label words (rows scored)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: perf_counter with torch's threads; cpu: this thread's CPU time, one torch thread "
                             "(the work runs in the calling thread, so other processes' load does not count)")
    args = parser.parse_args()
    global CLOCK
    if args.clock == "cpu":
        torch.set_num_threads(1)
        CLOCK = time.thread_time
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, batch {args.batch}, "
          f"{args.labels} label words, layer reference on {args.tokens}-token prompts; median of {args.repeats}")
    print("model          V        full vocab (ms)  label rows (ms)  speed-up  one layer (ms)  saved / layer")
    for name, shape in SHAPES.items():
        r = bench(name, shape, args.batch, args.tokens, args.labels, args.repeats)
        print(f"{name:14s} {shape['vocab']:<8d} {r['full_ms']:15.3f}  {r['rows_ms']:15.3f}  "
              f"{r['full_ms'] / r['rows_ms']:7.0f}x  {r['layer_ms']:14.3f}  {100 * r['saved_share_of_layer']:11.1f}%")


if __name__ == "__main__":
    main()
