"""``EarlyExitModule``: a LightningModule that runs backbone + head + exit strategy and measures it.

``test_step`` / ``predict_step`` tokenise a batch, time the exit loop (synchronising CUDA before
reading the clock) and record, per example, the prediction, exit layer, confidence and label. On
several devices each rank records its own slice and the ranks' records are gathered at the end of
the pass (:mod:`raee.distributed`).
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from raee.backbones.base import LayerwiseBackbone
from raee.distributed import gather_ranks, rank_results
from raee.exit_loop import ExitResult, run_early_exit
from raee.exits.base import BatchContext, ExitStrategy
from raee.features import encode_batch
from raee.heads.base import Head
from raee.metrics import computed_layer_statistics, exit_statistics, task_metrics


class EarlyExitModule(L.LightningModule):
    def __init__(self, backbone: LayerwiseBackbone, head: Head, strategy: ExitStrategy, warmup_batches: int = 1) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.strategy = strategy
        self.warmup_batches = warmup_batches
        self._reset()

    def _reset(self) -> None:
        self.records: list[dict[str, torch.Tensor]] = []
        self.wall_time_s = 0.0
        self.timings: dict[str, float] = {}
        self.rank_runs: list[dict[str, Any]] = []  # each rank's examples and seconds (several devices)
        self.flops = {"layer": 0.0, "key": 0.0}  # one backbone layer's and the keys' FLOPs, summed (raee.cost)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run_batch(self, batch: dict[str, Any]) -> tuple[ExitResult, float, dict[str, float]]:
        """Exit loop on one batch; returns the result, its wall-clock seconds and strategy timings."""
        inputs = encode_batch(self.backbone, self.head, batch)
        ctx = BatchContext(num_layers=self.backbone.num_layers, batch_size=len(batch["text"]),
                           texts=list(batch["text"]), text_pairs=batch.get("text_pair"),
                           labels=batch.get("label"), index=batch.get("index"))
        self._sync()
        start = time.perf_counter()
        result = run_early_exit(self.backbone, self.head, self.strategy, inputs, ctx)
        self._sync()
        seconds = time.perf_counter() - start
        self._last_tokens = inputs["attention_mask"].sum(1).cpu()  # for the FLOPs count, outside the timed region
        return result, seconds, ctx.timings

    def count_flops(self, texts: list[str]) -> None:
        """Add the last batch's FLOPs of one backbone layer and of its keys (a separate key encoder's)."""
        from raee.cost import layer_flops

        self.flops["layer"] += float(layer_flops(self.backbone.config, self._last_tokens).sum())
        key_flops = getattr(self.strategy, "key_flops", None)
        if callable(key_flops):
            self.flops["key"] += float(key_flops(texts))

    def on_test_start(self) -> None:
        self._reset()
        self.backbone.reset_counters()
        # warm-up on the first batches so that one-time costs (allocations, kernels) are not timed
        loader = self.trainer.test_dataloaders
        loader = loader[0] if isinstance(loader, (list, tuple)) else loader
        for i, batch in enumerate(loader):
            if i >= self.warmup_batches:
                break
            self.run_batch(batch)
        self.backbone.reset_counters()
        reset_flops = getattr(self.strategy, "reset_flops", None)  # token-level methods count FLOPs
        if callable(reset_flops):
            reset_flops()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        result, seconds, timings = self.run_batch(batch)
        self.wall_time_s += seconds
        self.count_flops(list(batch["text"]))
        for key, value in timings.items():
            self.timings[key] = self.timings.get(key, 0.0) + value
        self.records.append({"index": batch["index"].cpu(), "label": batch["label"].cpu(),
                             "prediction": result.predictions, "exit_layer": result.exit_layers,
                             "confidence": result.confidences})

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        result, _, _ = self.run_batch(batch)
        return {"index": batch["index"].cpu(), "prediction": result.predictions,
                "exit_layer": result.exit_layers, "confidence": result.confidences}

    def on_test_epoch_end(self) -> None:
        gather_ranks(self)  # several devices: every rank's rows and timings, on every rank
        stats = self.results()
        for key in ("accuracy", "macro_f1", "mcc", "pearson", "spearman", "mse", "mean_exit_layer", "wall_time_s",
                    "throughput"):
            if stats.get(key) is not None:
                # the same on every rank once gathered: synchronising keeps Lightning's epoch-level check quiet
                self.log(f"test/{key}", float(stats[key]), sync_dist=self.trainer.world_size > 1)

    # ------------------------------------------------------------------ results
    def predictions(self) -> dict[str, torch.Tensor]:
        """Per-example records of the last test run, concatenated, in data order."""
        if not self.records:
            raise RuntimeError("no test run recorded yet: call trainer.test(module, datamodule) first")
        cols = {k: torch.cat([r[k] for r in self.records]) for k in self.records[0]}
        order = torch.argsort(cols["index"])
        return {k: v[order] for k, v in cols.items()}

    def results(self) -> dict[str, Any]:
        """Metrics, exit statistics and timings of the last test run."""
        cols = self.predictions()
        n = int(cols["index"].numel())
        out: dict[str, Any] = {"num_examples": n}
        out.update(task_metrics(cols["prediction"], cols["label"], self.head.num_classes,
                                regression=getattr(self.head, "regression", False)))
        out.update(exit_statistics(cols["exit_layer"], self.backbone.num_layers))
        out.update(computed_layer_statistics(self.backbone.layer_examples, n, self.backbone.num_layers))
        retrieval = sum(v for k, v in self.timings.items() if k.startswith("retrieval"))
        out.update({"wall_time_s": self.wall_time_s, "throughput": n / self.wall_time_s if self.wall_time_s else None,
                    "retrieval_time_s": retrieval,
                    "retrieval_share": retrieval / self.wall_time_s if self.wall_time_s else None,
                    "timings": dict(self.timings), "layer_flops": self.flops["layer"], "key_flops": self.flops["key"],
                    "layer_examples": list(self.backbone.layer_examples)})
        if len(self.rank_runs) > 1:
            out.update(rank_results(self.rank_runs, n))
        return out
