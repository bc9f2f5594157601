"""Evaluation on several devices: ``trainer.devices=N`` with Lightning's DDP (gloo on CPU, NCCL on GPUs).

- Each rank evaluates a contiguous block of the evaluation loader's own batches (:func:`rank_loader`):
  the batches of a one-device run, none padded or repeated (Lightning's DistributedSampler would
  interleave examples into other batches and repeat some to even the ranks out).
- At the end of each pass every rank's per-example rows, timings and layer counters are gathered
  (:func:`gather_ranks`), so every rank holds the whole split's results: the same rows as one device.
- Timing: each rank times its own batches, for the method and for the full-model reference alike, on
  its own slice. The summary combines the ranks as :data:`RANK_COMBINATION` says, and lists each
  rank's own figures.
- :func:`launch_ranks` starts ranks 1..N-1 of one job as processes of the same command (``raee.run``
  does this for each job of any launcher), as torchrun would; Lightning then joins them. Processes
  that a cluster starts itself (SLURM tasks, torchrun) are left to Lightning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from raee.errors import UserError

log = logging.getLogger("raee")

#: how the ranks' figures become the run's (written into every multi-device summary)
RANK_COMBINATION = ("wall_time_s and full_wall_time_s: sum over ranks of each rank's timed seconds on its own slice "
                    "(device-seconds; wall_speedup = their ratio, as on one device); throughput: examples / the "
                    "slowest rank's seconds (the whole run); ranks: each rank's own examples, seconds, throughput "
                    "and speed-up")
#: strategy counters summed over ranks (HashEE counts its FLOPs and the full model's)
SUMMED_COUNTERS = ("flops", "full_flops")


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True in the process that writes a run's files: rank 0, or a run on one device."""
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def multi_device(trainer_kwargs: dict[str, Any]) -> bool:
    """Whether Lightning may run these trainer settings in several processes."""
    if int(trainer_kwargs.get("num_nodes", 1) or 1) > 1:
        return True
    devices = trainer_kwargs.get("devices", 1)
    if isinstance(devices, (list, tuple)):
        return len(devices) > 1
    text = str(devices).strip()
    if text.lstrip("-").isdigit():
        return int(text) > 1 or int(text) == -1
    return text == "auto" and str(trainer_kwargs.get("accelerator", "")) not in ("cpu",)


def device_count(trainer_kwargs: dict[str, Any]) -> int:
    """The number of processes ``trainer.devices`` (and ``num_nodes``) ask for; 0 when Lightning decides."""
    devices = trainer_kwargs.get("devices", 1)
    text = str(len(devices) if isinstance(devices, (list, tuple)) else devices).strip()
    nodes = int(trainer_kwargs.get("num_nodes", 1) or 1)
    return int(text) * nodes if text.isdigit() else 0


class RankBatches(Sampler):
    """The batches (or items) of ``batches`` that belong to this rank: a contiguous block, ranks in order.

    The rank is read when iterated (the process group exists by then), so one loader serves any rank."""

    def __init__(self, batches: Any) -> None:
        self.batches = batches

    def _mine(self) -> list[Any]:
        everything = list(self.batches)
        rank, size = world()
        return everything[rank * len(everything) // size:(rank + 1) * len(everything) // size]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._mine())

    def __len__(self) -> int:
        return len(self._mine())


def rank_loader(loader: Any, devices: int = 0) -> Any:
    """``loader`` with each rank taking a contiguous block of its batches (see module docstring); refuses a
    split with fewer batches than ``devices`` (a rank would have nothing to evaluate)."""
    if not isinstance(loader, DataLoader):
        raise UserError(f"multi-device evaluation needs the data module to return a torch DataLoader, got "
                        f"{type(loader).__name__}: use trainer.devices=1")
    batches = len(loader)
    if devices and batches < devices:
        raise UserError(f"the evaluation split has {batches} batch(es), fewer than trainer.devices={devices}: use "
                        f"fewer devices or a smaller data.eval_batch_size")
    common = dict(collate_fn=loader.collate_fn, num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                  persistent_workers=loader.persistent_workers if loader.num_workers else False)
    if loader.batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=RankBatches(loader.batch_sampler), **common)
    return DataLoader(loader.dataset, batch_size=None, sampler=RankBatches(loader.sampler), **common)


def gather_ranks(module: Any) -> None:
    """After a pass on several ranks: every rank's records, seconds, timings, layer counters, FLOPs (and the strategy's
    summed counters) gathered on every rank into ``module`` (records of all ranks, sums of the rest); each
    rank's own figures go to ``module.rank_runs``. Nothing happens on one device."""
    rank, size = world()
    if size == 1:
        return
    strategy = module.strategy
    mine = {"rank": rank, "records": module.records, "wall_time_s": module.wall_time_s, "timings": module.timings,
            "layer_examples": list(module.backbone.layer_examples), "flops": dict(getattr(module, "flops", {})),
            "counters": {c: getattr(strategy, c) for c in SUMMED_COUNTERS if hasattr(strategy, c)},
            "num_examples": int(sum(r["index"].numel() for r in module.records))}
    everyone: list[Any] = [None] * size
    torch.distributed.all_gather_object(everyone, mine)
    module.records = [r for run in everyone for r in run["records"]]
    module.wall_time_s = sum(run["wall_time_s"] for run in everyone)
    module.timings = {k: sum(run["timings"].get(k, 0.0) for run in everyone)
                      for k in sorted({k for run in everyone for k in run["timings"]})}
    module.backbone.layer_examples = [sum(c) for c in zip(*(run["layer_examples"] for run in everyone))]
    if mine["flops"]:  # one layer's and the keys' FLOPs (raee.cost): sums over every rank's examples
        module.flops = {k: sum(run["flops"][k] for run in everyone) for k in mine["flops"]}
    for name in mine["counters"]:
        setattr(strategy, name, sum(run["counters"][name] for run in everyone))
    module.rank_runs = [{k: run[k] for k in ("rank", "num_examples", "wall_time_s")} for run in everyone]


def rank_results(rank_runs: list[dict[str, Any]], num_examples: int) -> dict[str, Any]:
    """The run's throughput (examples / slowest rank's seconds) and each rank's own figures."""
    slowest = max(run["wall_time_s"] for run in rank_runs)
    ranks = [dict(run, throughput=run["num_examples"] / run["wall_time_s"] if run["wall_time_s"] else None)
             for run in rank_runs]
    return {"devices": len(rank_runs), "throughput": num_examples / slowest if slowest else None,
            "slowest_rank_wall_time_s": slowest, "ranks": ranks, "rank_combination": RANK_COMBINATION}


def combine_rank_summaries(method: dict[str, Any], full: dict[str, Any] | None) -> dict[str, Any]:
    """The summary fields of a multi-device run: each rank's full-model seconds and speed-up beside its own."""
    if not method.get("ranks"):
        return {}
    full_ranks = {r["rank"]: r for r in (full or {}).get("ranks", [])}
    ranks = []
    for run in method["ranks"]:
        full_s = full_ranks.get(run["rank"], {}).get("wall_time_s")
        ranks.append(dict(run, full_wall_time_s=full_s,
                          wall_speedup=full_s / run["wall_time_s"] if full_s and run["wall_time_s"] else None))
    return {"devices": method["devices"], "ranks": ranks, "rank_combination": method["rank_combination"],
            "slowest_rank_wall_time_s": method["slowest_rank_wall_time_s"]}


# ---------------------------------------------------------------------------------------------- launching ranks
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launched_externally() -> bool:
    """Whether another tool starts and numbers the processes (torchrun, SLURM tasks, an earlier launch)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    return "LOCAL_RANK" in os.environ or TorchElasticEnvironment.detect() or SLURMEnvironment.detect()


@contextlib.contextmanager
def launch_ranks(processes: int, command: Sequence[str], log_dir: str | Path) -> Iterator[None]:
    """Run the body as rank 0 of ``processes`` while ranks 1.. run ``command`` (the same job) as processes on
    this machine, each writing its output to ``<log_dir>/rank<r>.out``. On exit the ranks are waited for
    (a rank that failed is an error); if one dies while the body runs, the others and this process stop,
    rather than wait for it in a collective. The environment and process group are restored afterwards
    (a launcher may run the next job in this process)."""
    if processes <= 1 or launched_externally():
        yield
        return
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "LOCAL_RANK",
                                            "OMP_NUM_THREADS")}
    threads = torch.get_num_threads()  # Lightning gives each of N processes cores / N threads
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(processes),
                      NODE_RANK="0", LOCAL_RANK="0")
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    children: list[subprocess.Popen] = []
    outputs = []
    for rank in range(1, processes):
        out = open(log_dir / f"rank{rank}.out", "w")
        outputs.append(out)
        children.append(subprocess.Popen(list(command), env=dict(os.environ, LOCAL_RANK=str(rank)), stdout=out,
                                         stderr=subprocess.STDOUT))
    log.info("started ranks 1..%d of %d (output: %s/rank<r>.out)", processes - 1, processes, log_dir)
    done = threading.Event()
    watcher = threading.Thread(target=_watch, args=(children, done, log_dir), daemon=True)
    watcher.start()
    try:
        yield
        for rank, child in enumerate(children, start=1):
            if child.wait() != 0:
                raise RuntimeError(f"rank {rank} of {processes} failed (exit code {child.returncode}): see "
                                   f"{log_dir / f'rank{rank}.out'}")
    finally:
        done.set()
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        for out in outputs:
            out.close()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        torch.set_num_threads(threads)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _watch(children: list[subprocess.Popen], done: threading.Event, log_dir: Path) -> None:
    """Stop everything when a rank dies before the end: the others would wait for it in a collective."""
    while not done.wait(2.0):
        for rank, child in enumerate(children, start=1):
            if child.poll() not in (None, 0) and not done.is_set():
                print(f"rank {rank} died (exit code {child.returncode}; see {log_dir / f'rank{rank}.out'}): stopping "
                      "the other ranks", file=sys.stderr, flush=True)
                for other in children:
                    if other.poll() is None:
                        other.kill()
                time.sleep(0.5)
                os.kill(os.getpid(), signal.SIGTERM)
                return
