"""Self-speculative decoding (LayerSkip, Elhoushi et al. 2024): draft with the early layers, verify with the rest.

One round, for a sequence whose next input token is x (the last token output, not yet in the cache):

1. **Draft** up to d tokens with the first E layers: x, then each drafted token, runs layers 1..E (keys and values
   written to the cache of those layers) and the model's own final norm + LM head read at layer E gives the next
   draft (greedy). Drafting stops early at a token that would end the text.
2. **Verify** in one pass: the last draft runs layers 1..E too, then the k + 1 tokens [x, y_1..y_k] run layers
   E+1..L together from their layer-E states, which the draft already computed; the draft's keys and values of
   layers 1..E are reused, never recomputed. The LM head at layer L gives the full model's next token after each.
3. **Accept** the drafts up to the first disagreement, plus the full model's own next token there, and crop the
   cache to the accepted tokens (every layer of an accepted token holds exactly what the full model computes).

Greedy output is the full model's, token for token (tests check it against ``exit=full``); each accepted draft
saves a full decoding step. Batches are decoded one sequence at a time (rows would accept different numbers of
drafts); the speed-ups are measured at batch 1.

``draft_vocab=K`` (optional, not in LayerSkip): the drafts read only the K vocabulary rows most frequent in the
training targets (and the end tokens), as FR-Spec (Zhao et al. 2025) does for large vocabularies. A small model's
LM head is a large share of one token's cost (SmolLM2: 49,152 x 576, about as much as 8 of its 30 layers), and
every draft reads it; the verification still reads the whole vocabulary, so the output stays the full model's.

Why not transformers' ``generate(..., assistant_early_exit=E)`` (its ``EarlyExitCandidateGenerator``): it drives
the Hugging Face ``*ForCausalLM`` (raee's layerwise backbones hold the base model and the LM head apart), it
truncates the model through ``config.num_hidden_layers`` (the Llama family only: GPT-2's loop ignores it), and the
draft keeps a cache of its own: its verification runs all L layers over the drafts again instead of reusing the
draft's layers 1..E, the reuse LayerSkip describes. Its cost would also not be counted or timed on the same layer
code as raee's ``exit=full``. So this module builds the rounds on the decoding loop's own parts
(:mod:`raee.generation.decode`: the KV cache, :func:`raee.generation.step.update_active`, FLOPs by
:class:`raee.generation.flops.LayerCosts`); the tests check that its output also equals transformers'.

FLOPs are counted as the decoding loop counts them (:mod:`raee.generation.flops`): every layer run for every token
(drafts that are thrown away included), keys and values, and every LM-head read (one per draft, k + 1 per
verification). The full model's count covers the tokens it would have processed itself, so the FLOPs "speed-up" of
self-speculative decoding is below 1: it spends more arithmetic, and gains its time by verifying k + 1 tokens in
one pass over the upper layers' weights (memory traffic), not by skipping work.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Any

import torch
from torch.nn import functional as F

from raee.backbones.lm_head import split_lm_head
from raee.errors import UserError
from raee.generation.decode import GenerationOutput, KVCache
from raee.generation.flops import FlopsCount, LayerCosts
from raee.generation.layers import DecoderOps, Rotary, decoder_ops
from raee.generation.step import update_active
from raee.generation.strategies import EXTRA_METHODS, FullGeneration, GenerationExit


def resolve_draft_layer(setting: int | float, num_layers: int) -> int:
    """exit.draft_layer as a layer 1..L-1: a layer number, or a fraction of L in (0, 1) rounded to the nearest
    layer (0.25 of 30 layers = 8)."""
    if isinstance(setting, bool) or not isinstance(setting, (int, float)):
        raise UserError(f"exit.draft_layer={setting!r} must be a layer number (e.g. 8) or a fraction of L in (0, 1)")
    if isinstance(setting, float) and 0.0 < setting < 1.0:
        return min(num_layers - 1, max(1, math.floor(setting * num_layers + 0.5)))
    if float(setting).is_integer() and 1 <= setting < num_layers:
        return int(setting)
    raise UserError(f"exit.draft_layer={setting!r} must be a layer 1..{num_layers - 1} of this {num_layers}-layer "
                    "backbone (the drafts read the LM head there; the layers above verify) or a fraction of L in (0, 1)")


class _Stopper:
    """The decoding loop's stopping rule for one sequence: an end token, or a line break once something else has
    been written (one-line targets)."""

    def __init__(self, end_ids: set[int], newline_ids: set[int] | None) -> None:
        self.ends, self.newlines = set(end_ids), set(newline_ids or ())
        self.started = False

    def stops(self, token: int, started: bool | None = None) -> tuple[bool, bool]:
        """(whether ``token`` ends the text, whether something has been written after it), from ``started``
        (default: the sequence's own state)."""
        started = self.started if started is None else started
        return token in self.ends or (token in self.newlines and started), started or token not in self.newlines


class SelfSpeculativeGeneration(GenerationExit):
    """``exit=self_speculative``: draft ``draft_tokens`` tokens with layers 1..``draft_layer`` and the LM head,
    verify them with the remaining layers in one pass (see the module docstring)."""

    name = "self_speculative"

    def __init__(self, draft_layer: int | float = 0.25, draft_tokens: int = 4, draft_vocab: int | None = None) -> None:
        super().__init__()
        if isinstance(draft_tokens, bool) or int(draft_tokens) < 1:
            raise UserError(f"exit.draft_tokens={draft_tokens!r} must be >= 1 (tokens drafted per round)")
        if draft_vocab is not None and (isinstance(draft_vocab, bool) or int(draft_vocab) < 1):
            raise UserError(f"exit.draft_vocab={draft_vocab!r} must be a number of vocabulary rows >= 1, or null (the "
                            "drafts read the whole vocabulary)")
        self.draft_setting = draft_layer
        self.draft_tokens = int(draft_tokens)
        self.draft_vocab = None if draft_vocab is None else int(draft_vocab)
        self.draft_layer: int | None = None
        self.draft_ids: torch.Tensor | None = None  # (K,) the rows the drafts read (draft_vocab), most frequent first

    def validate(self, num_layers: int) -> None:
        if num_layers < 2:
            raise UserError(f"exit=self_speculative needs a backbone of 2 layers or more (it has {num_layers}): the "
                            "drafts use the early layers and the later ones verify them")
        self.draft_layer = resolve_draft_layer(self.draft_setting, num_layers)

    def knobs(self) -> dict[str, Any]:
        knobs = {"draft_layer": self.draft_layer if self.draft_layer is not None else self.draft_setting,
                 "draft_tokens": self.draft_tokens}
        return knobs | ({"draft_vocab": self.draft_vocab} if self.draft_vocab is not None else {})

    def fit(self, backbone: Any, head: Any, datamodule: Any, cache_dir: Any = None, progress: bool = True) -> None:
        """With ``draft_vocab``: the rows the drafts read, the K token ids most frequent in the training targets as
        ``head`` encodes them (ties by id), plus the end tokens."""
        if self.draft_vocab is None:
            return
        counts: Counter[int] = Counter()
        for target in datamodule.split("train").targets or []:
            counts.update(head.encode_target(target))
        self.use_draft_vocab([i for i, _ in sorted(counts.items(), key=lambda c: (-c[1], c[0]))][: self.draft_vocab],
                             head.end_ids)

    def use_draft_vocab(self, token_ids: list[int], always: set[int] | None = None) -> None:
        """Let the drafts read only ``token_ids`` (and ``always``, e.g. the end tokens)."""
        ids = list(dict.fromkeys([*map(int, token_ids), *sorted(always or ())]))
        if not ids:
            raise UserError("exit.draft_vocab: the training targets hold no token to draft")
        self.draft_ids = torch.tensor(ids, dtype=torch.long)

    def wall_clock_reference(self) -> GenerationExit:
        return FullGeneration()

    def report(self, strategy_stats: dict[str, Any] | None) -> dict[str, Any]:
        return acceptance_summary(strategy_stats)

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def generate(self, backbone: Any, prompts: list[list[int]], max_new_tokens: int, end_ids: set[int],
                 newline_ids: set[int] | None = None, pad_id: int = 0) -> GenerationOutput:
        """Greedy generation of every prompt, one at a time (see the module docstring). stats: prefill_s, and the
        counts ``drafted`` / ``accepted`` (drafts kept) / ``rounds`` (verification passes)."""
        if int(max_new_tokens) <= 0:
            raise UserError(f"max_new_tokens={max_new_tokens} must be a positive number of tokens to generate")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("every prompt needs at least one token: give a non-empty source")
        self.validate(backbone.num_layers)
        if backbone.lm_head is None:
            raise UserError(f"backbone '{backbone.name}' has no language-model head, so it cannot generate text: use "
                            "a causal LM with its head, e.g. backbone=smollm2")
        if self.draft_vocab is not None and self.draft_ids is None:
            raise RuntimeError("exit.draft_vocab is set but the draft vocabulary is not built: call fit() first "
                               "(run_experiment does) or use_draft_vocab()")
        run = _Rounds(backbone, self.draft_layer, self.draft_tokens, self.draft_ids)
        out = GenerationOutput(tokens=[], exit_layers=[], prompt_exit_layers=[], flops=FlopsCount(),
                               stats={"prefill_s": 0.0, "drafted": 0, "accepted": 0, "rounds": 0})
        for prompt in prompts:
            tokens, stats = run.one(prompt, int(max_new_tokens), _Stopper(end_ids, newline_ids), out.flops)
            out.tokens.append(tokens)
            out.exit_layers.append([backbone.num_layers] * len(tokens))  # every token is the full model's
            out.prompt_exit_layers.append([backbone.num_layers] * len(prompt))
            for key, value in stats.items():
                out.stats[key] += value
        return out


def acceptance_summary(stats: dict[str, Any] | None) -> dict[str, Any]:
    """Acceptance rate (drafts kept / drafted) and tokens per verification pass from summed ``strategy_stats``."""
    stats = stats or {}
    drafted, accepted, rounds = stats.get("drafted"), stats.get("accepted"), stats.get("rounds")
    return {"acceptance_rate": accepted / drafted if drafted else None,
            "tokens_per_round": (accepted + rounds) / rounds if rounds else None}


class _Rounds:
    """Draft / verify / accept rounds for one backbone (see the module docstring)."""

    def __init__(self, backbone: Any, draft_layer: int, draft_tokens: int, draft_ids: torch.Tensor | None = None
                 ) -> None:
        self.backbone = backbone
        self.ops: DecoderOps = decoder_ops(backbone)
        self.L, self.E, self.d = self.ops.num_layers, draft_layer, draft_tokens
        self.device = backbone.device
        self.dtype = next(backbone.model.parameters()).dtype
        vocab = int(backbone.lm_logits(torch.zeros(1, backbone.hidden_size, device=self.device)).shape[-1])
        self.costs = LayerCosts(self.ops, vocab)
        self.draft_head_macs = self.costs.head
        self.draft_rows: tuple[Any, torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None
        if draft_ids is not None and len(draft_ids) < vocab:
            # the rows copied once per call, not gathered at every draft (that copy would cost what it saves)
            transform, projection = split_lm_head(backbone.lm_head)
            ids = draft_ids.to(self.device)
            bias = None if projection.bias is None else projection.bias[ids].contiguous()
            self.draft_rows = (transform, projection.weight[ids].contiguous(), bias, ids)
            self.draft_head_macs = self.costs.head * len(ids) // vocab

    # ------------------------------------------------------------------ layers
    def embed(self, cache: KVCache, ids: list[int], first_position: int) -> tuple[torch.Tensor, torch.Tensor, Rotary,
                                                                                    int]:
        """Embed ``ids`` at consecutive positions and reserve their cache columns: (hidden (1, N, H), positions
        (1, N), rotary tables, first column)."""
        n = len(ids)
        positions = torch.arange(first_position, first_position + n, device=self.device).view(1, n)
        hidden = self.ops.embed(torch.tensor([ids], device=self.device), positions)
        start = cache.append(positions, torch.ones(1, n, dtype=torch.bool, device=self.device))
        return hidden, positions, self.ops.rotary(hidden, positions), start

    def layers(self, cache: KVCache, hidden: torch.Tensor, positions: torch.Tensor, rotary: Rotary, start: int,
               first: int, last: int) -> torch.Tensor:
        """Layers ``first``..``last`` for the (1, N) tokens in cache columns start..start+N (the cache's newest
        columns): their keys and values are written there, every token is active. Returns (1, N, H)."""
        ops = self.ops
        n = hidden.shape[1]
        layout = cache.layout()
        active = torch.ones(1, n, dtype=torch.bool, device=self.device)
        for layer in range(first, last + 1):
            normed = ops.attn_norm(layer, hidden)
            rot = ops.layer_rotary(rotary, layer)
            keys, values = cache.store(layer, *ops.keys_values(layer, normed, rot), start)
            hidden = update_active(ops, layer, hidden, normed, active, rot, positions, keys, values, layout,
                                   last=n == 1, everyone=True)
        return hidden

    def next_tokens(self, hidden: torch.Tensor) -> list[int]:
        """Greedy next token after each of the (N, H) states, read through the final norm and LM head."""
        return self.backbone.lm_logits(hidden).argmax(-1).tolist()

    def draft_token(self, hidden: torch.Tensor) -> int:
        """The draft after a (1, H) layer-E state: the LM head's argmax, over the draft vocabulary when there is one
        (a monotone logit cap, Gemma's, cannot change an argmax, so it is skipped there)."""
        if self.draft_rows is None:
            return self.next_tokens(hidden)[0]
        transform, weight, bias, ids = self.draft_rows
        x = self.backbone.final_norm(hidden)
        x = transform(x) if transform is not None else x
        return int(ids[F.linear(x, weight, bias).argmax(-1)])

    # ------------------------------------------------------------------ FLOPs (multiply-adds, as raee.generation.flops)
    def macs(self, layers: tuple[int, int], positions: list[int]) -> int:
        """Layers first..last (keys/values included) for tokens at ``positions``."""
        first, last = layers
        pos = torch.tensor(positions)
        upper = self.costs.active(torch.full_like(pos, last), pos)
        lower = self.costs.active(torch.full_like(pos, first - 1), pos) if first > 1 else 0
        return upper - lower + len(positions) * (last - first + 1) * self.costs.kv

    def full_macs(self, positions: list[int]) -> int:
        """What the full model spends on tokens it processes itself at ``positions``: L layers and one head read each."""
        return self.macs((1, self.L), positions) + len(positions) * self.costs.head

    @staticmethod
    def count(flops: FlopsCount, phase: str, macs: int, full_macs: int, tokens: int, head_reads: int) -> None:
        flops.macs[phase] += macs
        flops.full_macs[phase] += full_macs
        flops.tokens[phase] += tokens
        flops.head_reads[phase] += head_reads

    # ------------------------------------------------------------------ one sequence
    def one(self, prompt: list[int], max_new: int, stopper: _Stopper, flops: FlopsCount
            ) -> tuple[list[int], dict[str, float]]:
        """Greedy generation for one prompt; returns (generated ids, stats)."""
        L, E = self.L, self.E
        cache = KVCache(self.ops, 1, len(prompt) + max_new + self.d + 1, self.dtype, self.device)
        clock = time.perf_counter()
        hidden, positions, rotary, start = self.embed(cache, prompt, 0)
        hidden = self.layers(cache, hidden, positions, rotary, start, 1, L)
        token = self.next_tokens(hidden[0, -1:])[0]
        prefill_s = time.perf_counter() - clock
        full_prefill = self.full_macs(list(range(len(prompt)))) - (len(prompt) - 1) * self.costs.head
        self.count(flops, "prefill", full_prefill, full_prefill, len(prompt), 1)
        out = [token]
        stop, stopper.started = stopper.stops(token)
        stats = {"prefill_s": prefill_s, "drafted": 0, "accepted": 0, "rounds": 0}
        position = len(prompt)  # of the next input token
        while not stop and len(out) < max_new:
            x = out[-1]
            # 1. draft: at most d tokens, and no more than the tokens still allowed after the verifier's own
            states, drafts, started = [], [], stopper.started
            feed = x
            for _ in range(min(self.d, max_new - len(out) - 1)):
                h, pos, rot, col = self.embed(cache, [feed], position + len(drafts))
                h = self.layers(cache, h, pos, rot, col, 1, E)
                states.append(h)
                feed = self.draft_token(h[0])
                drafts.append(feed)
                ends, started = stopper.stops(feed, started)
                if ends:
                    break
            k = len(drafts)
            # 2. verify: the last draft (or x) through layers 1..E, then all k + 1 tokens through E+1..L at once
            h, pos, rot, col = self.embed(cache, [feed], position + k)
            states.append(self.layers(cache, h, pos, rot, col, 1, E))
            first_col = col - k
            verify_positions = torch.arange(position, position + k + 1, device=self.device).view(1, k + 1)
            top = self.layers(cache, torch.cat(states, dim=1), verify_positions,
                              self.ops.rotary(states[0], verify_positions), first_col, E + 1, L)
            full_next = self.next_tokens(top[0])
            # 3. accept the agreeing prefix and the full model's token after it
            j = 0
            while j < k and drafts[j] == full_next[j]:
                j += 1
            new = drafts[:j] + [full_next[j]]
            cache.crop(first_col + j + 1)
            kept = 0
            for t in new:
                if len(out) >= max_new:
                    break
                out.append(t)
                kept += 1
                stop, stopper.started = stopper.stops(t)
                if stop:
                    break
            fed = list(range(position, position + k + 1))
            spent = (self.macs((1, E), fed) + self.macs((E + 1, L), fed)  # every fed token through every layer
                     + k * self.draft_head_macs + (k + 1) * self.costs.head)  # k draft reads, k + 1 verification
            self.count(flops, "decode", spent, self.full_macs(fed[:kept]), kept, 2 * k + 1)
            stats["drafted"] += k
            stats["accepted"] += j
            stats["rounds"] += 1
            position += j + 1
        return out, stats


EXTRA_METHODS.append(SelfSpeculativeGeneration.name)
