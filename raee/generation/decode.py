"""The decoding loop: greedy generation layer by layer, a KV cache per layer, token-level exits.

This is the generation counterpart of :mod:`raee.exit_loop`. Read :func:`generate` top to bottom:
left-pad the prompts -> prefill (every prompt token at once) -> repeat: take the argmax token, stop rows that
ended, run one decoding step on the new tokens.

One step (:meth:`Decoder.step`) runs layers 1..L on the step's tokens, as long as any of them is active:

- the strategy plans every token's exit layer (``plan``: full = L, fixed = l, HashEE = the hash of its id)
  and a dynamic strategy (CALM's confidence) may end a token earlier from the LM head's output at a layer;
- at each layer, keys and values of *every* token of the step come from its current state, so a token that
  left below keeps contributing keys and values of its copied state; queries, attention output and the
  feed-forward run only for the active tokens (:func:`raee.generation.step.update_active`);
- once no token of the step is active, the loop stops: the layers above are never computed for them. Their
  keys and values there are filled in lazily, from each token's kept final state, by the first later step
  that reaches such a layer (never, if none does: ``fixed`` at l never runs a layer above l).

The token read at each row is its last one (the last prompt token in prefill, the new token in a decoding
step): its next token is the argmax of the LM head at its exit layer. Every generated token's exit layer is
recorded, and FLOPs are counted per phase (:mod:`raee.generation.flops`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from raee.backbones.base import LayerwiseBackbone
from raee.errors import UserError
from raee.generation.flops import FlopsCount, LayerCosts
from raee.generation.layers import DecoderOps, decoder_ops
from raee.generation.step import KeyLayout, update_active


class KVCache:
    """Keys and values of every layer for a batch, preallocated to ``capacity`` columns.

    Columns are time steps (left-padded prompts share them). ``filled[l]``: columns whose layer-l keys/values
    are computed; ``top``: every column's final state (its state above its exit layer), from which missing
    keys/values are computed when a later step reaches that layer.
    """

    def __init__(self, ops: DecoderOps, batch: int, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        L = ops.num_layers
        shape = (batch, ops.num_kv_heads, capacity, ops.head_dim)
        self.keys = [torch.empty(0)] + [torch.empty(shape, dtype=dtype, device=device) for _ in range(L)]
        self.values = [torch.empty(0)] + [torch.empty(shape, dtype=dtype, device=device) for _ in range(L)]
        self.filled = [0] * (L + 1)
        self.positions = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.top = torch.empty(batch, capacity, ops.hidden_size, dtype=dtype, device=device)
        self.length = 0  # columns in use

    def append(self, positions: torch.Tensor, valid: torch.Tensor) -> int:
        """Reserve columns for a step's (B, N) tokens; returns the first."""
        start, n = self.length, positions.shape[1]
        if start + n > self.positions.shape[1]:
            raise RuntimeError(f"KV cache full: {start} + {n} columns > capacity {self.positions.shape[1]}")
        self.positions[:, start:start + n] = positions
        self.valid[:, start:start + n] = valid
        self.length = start + n
        return start

    def store(self, layer: int, keys: torch.Tensor, values: torch.Tensor, start: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a step's (B, Hkv, N, D) keys and values of ``layer`` into columns start..start+N (the newest);
        returns the keys and values of every column up to there, the step's included."""
        end = start + keys.shape[2]
        self.keys[layer][:, :, start:end] = keys
        self.values[layer][:, :, start:end] = values
        self.filled[layer] = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def crop(self, length: int) -> None:
        """Forget the columns from ``length`` on (self-speculative decoding's rejected drafts)."""
        self.length = length
        self.filled = [min(f, length) for f in self.filled]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (finished sequences leave the batch)."""
        for layer in range(1, len(self.keys)):
            self.keys[layer] = self.keys[layer][rows]
            self.values[layer] = self.values[layer][rows]
        self.positions, self.valid, self.top = self.positions[rows], self.valid[rows], self.top[rows]

    def layout(self) -> KeyLayout:
        return KeyLayout.of(self.positions[:, :self.length], self.valid[:, :self.length])


@dataclass
class StepResult:
    logits: torch.Tensor  # (B, V) LM-head output at each row's read token, at its exit layer
    exit_layers: torch.Tensor  # (B,) exit layer of each row's read token


@dataclass
class GenerationOutput:
    """Per prompt: generated ids (the end token included when one was generated) and each one's exit layer (the
    layer of the step that produced it); the phases' wall-clock and FLOPs."""

    tokens: list[list[int]]
    exit_layers: list[list[int]]
    prompt_exit_layers: list[list[int]]  # exit layer of every prompt token (prefill), real tokens only
    flops: FlopsCount = field(default_factory=FlopsCount)
    stats: dict[str, Any] = field(default_factory=dict)


class Decoder:
    """Greedy decoding of one backbone with one generation strategy (see the module docstring)."""

    def __init__(self, backbone: LayerwiseBackbone, strategy: Any) -> None:
        self.backbone = backbone
        self.strategy = strategy
        self.ops = decoder_ops(backbone)
        self.L = self.ops.num_layers
        if backbone.lm_head is None:
            raise UserError(f"backbone '{backbone.name}' has no language-model head, so it cannot generate text: use a "
                            "causal LM with its head, e.g. backbone=smollm2 or backbone=gemma3_270m")
        self.vocab = int(backbone.lm_logits(torch.zeros(1, backbone.hidden_size, device=backbone.device)).shape[-1])
        self.costs = LayerCosts(self.ops, self.vocab)
        self.cache: KVCache | None = None

    # ------------------------------------------------------------------ one step
    def step(self, cache: KVCache, input_ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
             reads: torch.Tensor, flops: FlopsCount, phase: str) -> tuple[StepResult, torch.Tensor]:
        """Run the step's tokens (B, N) through the layers with exits; returns the read tokens' result and every
        token's exit layer (B, N) (-1 for padding).

        reads: (B, N) bool, the tokens whose next token is read (the last column); the strategy plans exits from
        the ids and this mask (HashEE's prompt-only mode keeps the read tokens at L).
        """
        ops, L, strategy = self.ops, self.L, self.strategy
        B, N = input_ids.shape
        hidden = ops.embed(input_ids, positions)
        plan = strategy.plan(input_ids, reads).to(hidden.device).clamp(0, L)
        plan = torch.where(valid, plan, torch.zeros_like(plan))
        start = cache.append(positions, valid)
        end = start + N
        rotary = ops.rotary(hidden, positions)
        layout = cache.layout()
        last = N == 1  # a decoding step: each row's one token is its newest, causality holds by itself
        exits = torch.where(valid, plan, torch.full_like(plan, -1))
        planned = set(plan[valid].tolist())  # the layers where planned exits happen (one read of the plan)
        logits = hidden.new_empty(B, self.vocab)
        read_exit = torch.full((B,), -1, dtype=torch.long, device=hidden.device)
        pending = torch.ones(B, dtype=torch.bool, device=hidden.device)  # rows whose read token is still running
        n_valid = int(valid.sum())
        head_reads, kv_rows = 0, 0
        dynamic = bool(getattr(strategy, "dynamic", False))
        needs_logits = bool(getattr(strategy, "needs_logits", True))
        previous: torch.Tensor | None = None  # (B, H) read tokens' states at the last layer a dynamic rule checked
        active = plan >= 1
        n_active = n_valid - int((plan[valid] == 0).sum()) if 0 in planned else n_valid

        def read(rows: torch.Tensor, layer: int, values: torch.Tensor | None = None) -> None:
            """The read tokens of ``rows`` leave at ``layer``: their LM-head output (computed here unless given)."""
            nonlocal head_reads
            if values is None:
                values = self.backbone.lm_logits(hidden[rows, N - 1])
                head_reads += int(values.shape[0])
            logits[rows] = values.to(logits.dtype)
            read_exit[rows] = layer
            pending[rows] = False

        if 0 in planned:  # read tokens planned to leave at the embeddings
            read(plan[:, N - 1] == 0, 0)
        for layer in range(1, L + 1):
            if n_active == 0:
                break
            kv_rows += self._fill_pending(cache, layer, start)
            normed = ops.attn_norm(layer, hidden)
            rot = ops.layer_rotary(rotary, layer)
            keys, values = cache.store(layer, *ops.keys_values(layer, normed, rot), start)
            kv_rows += n_valid
            hidden = update_active(ops, layer, hidden, normed, active, rot, positions, keys, values, layout, last=last,
                                   everyone=n_active == B * N)
            leaving = active & (plan == layer) if layer in planned else None
            if dynamic and strategy.checks(layer):
                rows = active[:, N - 1] & pending
                if leaving is not None:
                    rows = rows & ~leaving[:, N - 1]
                if bool(rows.any()):
                    now = hidden[rows, N - 1]
                    values = self.backbone.lm_logits(now) if needs_logits else None
                    head_reads += int(now.shape[0]) if needs_logits else 0
                    decided = strategy.should_exit(layer, values, now, None if previous is None else previous[rows])
                    previous = hidden[:, N - 1]
                    if bool(decided.any()):
                        chosen = torch.nonzero(rows).flatten()[decided]
                        read(chosen, layer, None if values is None else values[decided])
                        exits[chosen, N - 1] = layer
                        if leaving is None:
                            leaving = torch.zeros_like(active)
                        leaving[chosen, N - 1] = True
            if leaving is not None:
                done = leaving[:, N - 1] & pending
                if bool(done.any()):
                    read(done, layer)
                active = active & ~leaving
                n_active = int(active.sum())
        cache.top[:, start:end] = hidden
        flops.add_step(self.costs, phase, exits[valid], positions[valid], kv_rows, head_reads, reads=B)
        return StepResult(logits=logits, exit_layers=read_exit), exits

    def _fill_pending(self, cache: KVCache, layer: int, start: int) -> int:
        """Keys and values at ``layer`` of earlier columns that no step computed there yet (their tokens and every
        token after them had left below it), from those columns' final states; returns the rows computed."""
        first = cache.filled[layer]
        if first >= start:
            return 0
        ops = self.ops
        states = cache.top[:, first:start]
        positions = cache.positions[:, first:start]
        rot = ops.layer_rotary(ops.rotary(states, positions), layer)
        k, v = ops.keys_values(layer, ops.attn_norm(layer, states), rot)
        cache.keys[layer][:, :, first:start] = k
        cache.values[layer][:, :, first:start] = v
        cache.filled[layer] = start
        return int(cache.valid[:, first:start].sum())

    # ------------------------------------------------------------------ the loop
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, end_ids: set[int],
                 newline_ids: set[int] | None = None, pad_id: int = 0) -> GenerationOutput:
        """Greedy generation for a batch of prompts (token ids). A row stops after an end token, after a line break
        once it has written something else (``newline_ids``, one-line targets), or after ``max_new_tokens``."""
        if int(max_new_tokens) <= 0:
            raise UserError(f"max_new_tokens={max_new_tokens} must be a positive number of tokens to generate")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("every prompt needs at least one token: give a non-empty source")
        device = self.backbone.device
        B, T = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, T), int(pad_id), dtype=torch.long)
        valid = torch.zeros(B, T, dtype=torch.bool)
        for i, p in enumerate(prompts):  # left padding: every row's newest token in the last column
            ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
            valid[i, T - len(p):] = True
        ids, valid = ids.to(device), valid.to(device)
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        dtype = next(self.backbone.model.parameters()).dtype
        cache = KVCache(self.ops, B, T + int(max_new_tokens), dtype, device)
        flops = FlopsCount()
        reads = torch.zeros(B, T, dtype=torch.bool, device=device)
        reads[:, -1] = True
        clock = time.perf_counter()
        result, prompt_exits = self.step(cache, ids, positions, valid, reads, flops, "prefill")
        _sync(device)
        prefill_s = time.perf_counter() - clock

        out_tokens: list[list[int]] = [[] for _ in range(B)]
        out_exits: list[list[int]] = [[] for _ in range(B)]
        prompt_exit_layers = [prompt_exits[i][valid[i]].tolist() for i in range(B)]
        rows = list(range(B))  # prompt index of each remaining batch row
        next_pos = positions[:, -1] + 1
        started = [False] * B
        ends, newlines = set(end_ids), set(newline_ids or ())
        for t in range(int(max_new_tokens)):
            tokens = result.logits.argmax(-1)
            keep = []
            for r, (token, layer) in enumerate(zip(tokens.tolist(), result.exit_layers.tolist())):
                i = rows[r]
                out_tokens[i].append(token)
                out_exits[i].append(layer)
                stop = token in ends or (token in newlines and started[i])
                started[i] = started[i] or token not in newlines
                if not stop:
                    keep.append(r)
            if not keep or t == int(max_new_tokens) - 1:
                break
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=device)
                cache.keep_rows(index)
                tokens, next_pos = tokens[index], next_pos[index]
                rows = [rows[r] for r in keep]
            n = len(rows)
            result, _ = self.step(cache, tokens.view(n, 1), next_pos.view(n, 1),
                                  torch.ones(n, 1, dtype=torch.bool, device=device),
                                  torch.ones(n, 1, dtype=torch.bool, device=device), flops, "decode")
            next_pos = next_pos + 1
        self.cache = cache  # the last batch's cache, for inspection (tests)
        return GenerationOutput(tokens=out_tokens, exit_layers=out_exits, prompt_exit_layers=prompt_exit_layers,
                                flops=flops, stats={"prefill_s": prefill_s})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
