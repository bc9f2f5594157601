"""Benchmark (not a test): the exit database at 100k, 1M and 10M entries, per index type.

Keys are synthetic but clustered like real ones: each is a random convex mix of a real
all-MiniLM-L6-v2 key of a BBC News article and up to three of that article's nearest articles
(Dirichlet weights) plus a little Gaussian noise, L2-normalised; queries are fresh draws from
the same process. Keys are generated chunk by chunk from seeded generators (row r is always the
same key), so no step holds all of them. Each (size, index) runs in its own process through the
real streaming build (raee.database: shards on disk, index trained on a seeded sample and filled
shard by shard, keys dropped) and prints:

- build time, peak resident memory (the process's maximum RSS, build and search; memory-mapped
  pages it touched count), disk size of the database directory;
- search latency per query at k=12, batch 1 and batch 256, wall clock; at batch 1 also the search
  thread's CPU time (what the query costs when the cores are not shared: on a loaded machine the
  wall clock adds the time other processes held the core);
- recall@12 against exact search (brute force over the regenerated keys) on the query sample;
- the retrieval share against one MiniLM forward pass (timed in the same run):
  search / (search + forward) at batch 1, and per query at batch 256 against the per-example
  forward at batch 32;
- for IVF indexes, recall and batch-1 latency of the same index under other search knobs (nprobe,
  and k_factor for a re-ranking index) in ``--json``: how the defaults of faiss_ivfpq.yaml were chosen.

The ivfpq-sq8 index takes its search knobs (nprobe, ef_search, k_factor) from
conf/retriever/faiss_ivfpq.yaml; its nlist (about 2 sqrt(N)) and PQ48 are the benchmark's own, so that
k-means training stays within minutes on 2 cores.

Sizes or indexes that would not fit (memory cap, free disk, time cap extrapolated from the last
size) are skipped with a line saying why; a process over the memory or time cap is stopped.

    nice -n 10 python experiments/benchmark_db_scale.py --sizes 100k 1M            # the default indexes
    nice -n 15 python experiments/benchmark_db_scale.py --sizes 10M --indexes ivfpq ivfpq-sq8 --max-memory-gb 8
    python experiments/benchmark_db_scale.py --dim 4096 --sizes 100k                 # Llama-3-8B-wide keys
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

K = 12
CHUNK = 1 << 16  # rows per generated chunk (row r's key depends only on the seed and r)
LAYERS = 6  # MiniLM-L6: exit tables have 7 columns
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
IVFPQ_CONFIG = Path(__file__).resolve().parents[1] / "conf" / "retriever" / "faiss_ivfpq.yaml"
SWEEP_NPROBE = (4, 8, 16, 32)
SWEEP_K_FACTOR = (4, 16, 32)


# ---------------------------------------------------------------------------- the synthetic keys
def base_keys(workdir: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(2225, 384) real MiniLM keys (mean-pooled last layer, normalised) of every BBC News article, their
    class ids, and the texts; computed once and cached in ``workdir``."""
    from raee.data.sources import load_bbcnews

    raw = load_bbcnews()
    frame = raw.frames["train"]
    texts = frame["text"].tolist()
    labels = np.array([raw.label_names.index(c) for c in frame["label"]], dtype=np.int64)
    cache = workdir / "bbc_minilm_keys.npy"
    if cache.exists():
        return np.load(cache, allow_pickle=False), labels, texts
    import torch

    backbone = minilm()
    keys = []
    with torch.no_grad():
        for start in range(0, len(texts), 32):
            keys.append(forward_keys(backbone, texts[start:start + 32]))
    out = np.concatenate(keys).astype(np.float32)
    np.save(cache, out, allow_pickle=False)
    return out, labels, texts


def minilm() -> Any:
    from raee.backbones import load_backbone

    return load_backbone(MINILM, max_length=128)


def forward_keys(backbone: Any, texts: list[str]) -> np.ndarray:
    """One MiniLM forward pass over ``texts`` -> their normalised mean-pooled keys (B, 384)."""
    import torch

    from raee.heads.pooling import pool

    enc = backbone.tokenize(texts)
    hidden = backbone.model(**enc).last_hidden_state
    return torch.nn.functional.normalize(pool(hidden, enc["attention_mask"], "mean"), dim=-1).numpy()


class ClusteredKeys:
    """Row r of an endless stream of keys clustered like the base keys (see the module docstring)."""

    def __init__(self, base: np.ndarray, labels: np.ndarray, dim: int, seed: int = 0, mix: int = 4,
                 alpha: float = 1.0, noise: float = 0.03) -> None:
        self.base, self.labels, self.dim, self.seed = base, labels, dim, seed
        self.mix, self.alpha, self.noise = mix, alpha, noise
        sims = base @ base.T
        np.fill_diagonal(sims, -np.inf)
        self.near = np.argsort(-sims, axis=1)[:, :8]  # each article's 8 nearest articles
        rng = np.random.default_rng(seed + 7)
        # wider keys (e.g. 4096 for Llama-3-8B): a fixed random projection keeps the cluster structure
        self.project = None if dim == base.shape[1] else (
            rng.standard_normal((base.shape[1], dim)).astype(np.float32) / math.sqrt(base.shape[1]))

    def _draw(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        first = rng.integers(0, len(self.base), n)
        others = self.near[first[:, None], rng.integers(0, self.near.shape[1], (n, self.mix - 1))]
        members = np.concatenate([first[:, None], others], axis=1)  # (n, mix)
        weights = rng.dirichlet(np.full(self.mix, self.alpha), n).astype(np.float32)
        x = (self.noise / math.sqrt(self.base.shape[1])) * rng.standard_normal((n, self.base.shape[1]),
                                                                                dtype=np.float32)
        for j in range(self.mix):  # one (n, 384) term at a time: memory stays at a few chunks
            x += weights[:, j:j + 1] * self.base[members[:, j]]
        if self.project is not None:
            x = x @ self.project
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32), self.labels[first]

    def chunk(self, number: int, total: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys (n, dim) and labels of rows [number * CHUNK, min(total, (number + 1) * CHUNK))."""
        n = min(CHUNK, total - number * CHUNK)
        return self._draw(np.random.default_rng([self.seed, number]), n)

    def queries(self, n: int) -> np.ndarray:
        return self._draw(np.random.default_rng([self.seed, 10**9]), n)[0]


def exact_neighbours(gen: ClusteredKeys, total: int, queries: np.ndarray, workdir: Path) -> np.ndarray:
    """(Q, K) ids of the true nearest keys (inner product), brute force chunk by chunk; cached."""
    cache = workdir / f"exact-{total}-{gen.dim}-{len(queries)}-{gen.seed}.npy"
    if cache.exists():
        return np.load(cache, allow_pickle=False)
    best_s = np.full((len(queries), K), -np.inf, np.float32)
    best_i = np.zeros((len(queries), K), np.int64)
    for number in range(math.ceil(total / CHUNK)):
        keys, _ = gen.chunk(number, total)
        scores = queries @ keys.T
        top = np.argpartition(-scores, K - 1, axis=1)[:, :K]
        s = np.concatenate([best_s, np.take_along_axis(scores, top, 1)], 1)
        i = np.concatenate([best_i, top + number * CHUNK], 1)
        keep = np.argsort(-s, axis=1, kind="stable")[:, :K]
        best_s, best_i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
    np.save(cache, best_i, allow_pickle=False)
    return best_i


# ---------------------------------------------------------------------------- index types
def index_specs(size: int, dim: int) -> dict[str, dict[str, Any]]:
    """name -> FaissRetriever settings for a database of ``size`` keys."""
    # ~2 sqrt(N) lists, a power of two, at most 4096: k-means training stays within minutes on 2 cores
    nlist = min(4096, 1 << int(round(math.log2(max(64.0, 2 * math.sqrt(size))))))
    m = 48 if dim % 48 == 0 else 64  # 8 dims per PQ code byte at D=384
    ivf = f"IVF{nlist}_HNSW32"  # HNSW coarse quantizer: assigning keys to lists stays cheap at 10M
    import yaml

    tuned = yaml.safe_load(IVFPQ_CONFIG.read_text())  # the shipped large-database search knobs
    return {
        "flat": {"factory": "Flat", "metric": "ip", "storage": "mmap"},
        "hnsw-pq": {"factory": f"HNSW32,PQ{m}", "metric": "l2", "ef_search": 128, "storage": "mmap"},
        "ivfpq": {"factory": f"{ivf},PQ{m}", "metric": "ip", "nprobe": 32, "ef_search": 64, "storage": "ondisk"},
        "ivfpq-sq8": {"factory": f"{ivf},PQ{m},Refine(SQ8)", "metric": "ip", "nprobe": tuned["nprobe"],
                      "ef_search": tuned["ef_search"], "k_factor": tuned["k_factor"], "storage": "ondisk"},
    }


def estimate(name: str, spec: dict[str, Any], size: int, dim: int) -> dict[str, float]:
    """Rough bytes of memory and disk one build needs (for skipping what cannot fit)."""
    from raee.retrieval.faiss_index import auto_train_size

    nlist = int(spec["factory"].split("IVF")[1].split("_")[0]) if "IVF" in spec["factory"] else 0
    sample = auto_train_size(size, dim, nlist) * dim * 4 if ("PQ" in spec["factory"] or nlist) else 0
    m = int(spec["factory"].split("PQ")[1].split(",")[0]) if "PQ" in spec["factory"] else 0
    index_memory = {"flat": size * dim * 4, "hnsw-pq": size * (m + 32 * 2 * 4 * 1.2), "ivfpq": 0,
                    "ivfpq-sq8": size * dim}[name]
    index_disk = {"flat": size * dim * 4, "hnsw-pq": size * (m + 32 * 2 * 4 * 1.2), "ivfpq": size * (m + 8),
                  "ivfpq-sq8": size * (m + 8 + dim)}[name]
    memory = 0.6e9 + sample * 1.5 + index_memory + 0.3e9  # interpreter+libraries, training, index, shard buffer
    disk = size * dim * 4 + index_disk + size * (LAYERS + 1) * 4  # keys spilled while building, index, tables
    return {"memory": memory, "disk": disk}


# ---------------------------------------------------------------------------- one (size, index) in its own process
def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    import faiss
    import torch

    from raee.database import FORMAT_VERSION, ExitDatabase, store
    from raee.database.build import finish_database
    from raee.retrieval import FaissRetriever

    faiss.omp_set_num_threads(spec["threads"])
    torch.set_num_threads(spec["threads"])
    workdir, size, dim = Path(spec["workdir"]), spec["size"], spec["dim"]
    base, labels, _ = base_keys(workdir)
    gen = ClusteredKeys(base, labels, dim, seed=spec["seed"])
    directory = workdir / f"db-{size}-{dim}-{spec['name']}"
    shutil.rmtree(directory, ignore_errors=True)
    rng = np.random.default_rng(spec["seed"])
    started = time.perf_counter()
    writer = store.ShardWriter(directory / store.SHARDS_DIR, store.default_shard_rows(dim, LAYERS))
    for number in range(math.ceil(size / CHUNK)):
        keys, y = gen.chunk(number, size)
        # exit tables shaped like MiniLM's: later layers more often right, probabilities in (0.2, 1)
        correct = rng.random((len(y), LAYERS + 1)) < np.linspace(0.3, 0.95, LAYERS + 1)
        preds = np.where(correct, y[:, None], (y[:, None] + 1) % 5)
        writer.add(keys=keys, labels=y, preds=preds, probs=rng.uniform(0.2, 1.0, correct.shape), correct=correct,
                   ids=np.arange(number * CHUNK, number * CHUNK + len(y)))
    shards = writer.close()
    meta = {"format": FORMAT_VERSION, "backbone": "synthetic", "num_layers": LAYERS, "head": {}, "key_encoder": {},
            "seed": spec["seed"], "keep_keys": False, "label_names": ["0", "1", "2", "3", "4"]}
    finish_database(directory, FaissRetriever(**spec["retriever"]), meta, shards, progress=False)
    build_s = time.perf_counter() - started
    db = ExitDatabase.load(directory, verify=False)  # as a run opens it: memory-mapped tables and index
    queries = gen.queries(spec["queries"])
    retriever = db.retriever
    # batch 1 on one thread (how a server answers single queries; OpenMP threads only wait on each other
    # for one query), batch 256 on all of them
    faiss.omp_set_num_threads(1)
    for q in queries[:20]:  # warm-up (page-in, allocations)
        retriever.search(q[None], K)
    single = queries[:min(len(queries), 300)]
    truth = np.load(spec["truth"], allow_pickle=False)

    def measure() -> tuple[float, float, float, float]:
        """(batch-1 wall ms, batch-1 CPU ms, batch-256 wall ms per query, recall@12) of the index as set now."""
        faiss.omp_set_num_threads(1)
        t, cpu = time.perf_counter(), time.thread_time()  # FAISS searches on this thread at 1 OpenMP thread
        for q in single:
            retriever.search(q[None], K)
        b1 = 1e3 * (time.perf_counter() - t) / len(single)
        b1_cpu = 1e3 * (time.thread_time() - cpu) / len(single)
        faiss.omp_set_num_threads(spec["threads"])
        t = time.perf_counter()
        ids = np.concatenate([retriever.search(queries[s:s + 256], K)[1] for s in range(0, len(queries), 256)])
        b256 = 1e3 * (time.perf_counter() - t) / len(queries)
        return b1, b1_cpu, b256, float(np.mean([len(set(a) & set(b)) / K for a, b in zip(ids, truth)]))

    batch1_ms, batch1_cpu_ms, batch256_ms, recall = measure()
    sweep = []  # the same index with other search knobs (probed lists, re-ranked candidates): recall vs latency
    if "nprobe" in spec["retriever"]:
        space = faiss.ParameterSpace()
        refine = "Refine" in spec["retriever"]["factory"] or "RFlat" in spec["retriever"]["factory"]
        for nprobe in SWEEP_NPROBE:
            for k_factor in SWEEP_K_FACTOR if refine else (None,):
                space.set_index_parameter(retriever.index, "nprobe", nprobe)
                if k_factor:
                    space.set_index_parameter(retriever.index, "k_factor_rf", k_factor)
                b1, b1_cpu, b256, rec = measure()
                sweep.append({"nprobe": nprobe, "k_factor": k_factor, "batch1_ms": b1, "batch1_cpu_ms": b1_cpu,
                              "batch256_ms": b256, "recall": rec})
    disk = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    if not spec["keep"]:
        shutil.rmtree(directory, ignore_errors=True)
    return {"build_s": build_s, "peak_rss_gb": peak_rss() / 2**30,
            "disk_gb": disk / 1e9, "batch1_ms": batch1_ms, "batch1_cpu_ms": batch1_cpu_ms, "batch256_ms": batch256_ms,
            "recall": recall, "shards": len(shards), "factory": db.meta["retriever"]["factory"],
            "knobs": {k: spec["retriever"].get(k) for k in ("nprobe", "ef_search", "k_factor")}, "sweep": sweep}


def peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM: unlike ru_maxrss it does not carry the
    parent's peak over a fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_in_child(spec: dict[str, Any], max_rss: float, max_s: float) -> dict[str, Any]:
    """run_one in a fresh process (its own peak RSS), stopped when over the memory or time cap."""
    import psutil

    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE,
                            text=True)
    watched, started, peak = psutil.Process(proc.pid), time.monotonic(), 0
    while proc.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if peak > max_rss or time.monotonic() - started > max_s:
            proc.kill()
            proc.wait()
            why = f"RSS {peak / 2**30:.1f} GiB over the cap" if peak > max_rss else f"over {max_s / 60:.0f} minutes"
            return {"stopped": why}
        time.sleep(0.5)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        return {"stopped": f"failed (exit code {proc.returncode})"}
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- the MiniLM reference
def time_minilm(texts: list[str], threads: int) -> dict[str, float]:
    """Milliseconds of one MiniLM forward pass per example: batch 1 (one thread, median of 20) and
    batch 32 (``threads`` threads, median of 3)."""
    import torch

    backbone = minilm()
    with torch.no_grad():
        torch.set_num_threads(1)  # batch 1 on one thread, like the batch-1 search
        forward_keys(backbone, texts[:2])  # warm-up
        one = []
        for text in texts[:20]:
            t = time.perf_counter()
            forward_keys(backbone, [text])
            one.append(time.perf_counter() - t)
        torch.set_num_threads(threads)  # (the model is freed on return: the parent stays small)
        batch = []
        for start in range(0, 96, 32):
            t = time.perf_counter()
            forward_keys(backbone, texts[start:start + 32])
            batch.append((time.perf_counter() - t) / 32)
    return {"batch1_ms": 1e3 * statistics.median(one), "batch32_ms": 1e3 * statistics.median(batch)}


def parse_size(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 10**3, "m": 10**6}.get(text[-1], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["100k", "1M", "10M"])
    parser.add_argument("--indexes", nargs="+", default=["flat", "hnsw-pq", "ivfpq", "ivfpq-sq8"])
    parser.add_argument("--dim", type=int, default=384, help="key dimension (384 MiniLM; 4096 like Llama-3-8B)")
    parser.add_argument("--queries", type=int, default=1000, help="queries for recall and batch-256 latency")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-memory-gb", type=float, default=4.0, help="stop/skip above this peak RSS")
    parser.add_argument("--max-minutes", type=float, default=40.0, help="stop/skip a build+search above this")
    parser.add_argument("--workdir", default="/tmp/raee-bench", help="databases and caches (large)")
    parser.add_argument("--keep", action="store_true", help="keep the databases (default: deleted after each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--markdown", help="also write the table (markdown, as in the README) to this file")
    parser.add_argument("--previous", help="results JSON of an earlier run: its build times predict this run's "
                                           "(to skip sizes that would pass --max-minutes)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(json.loads(args.child))))
        return

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    base, labels, texts = base_keys(workdir)
    reference = time_minilm(texts, args.threads)
    gen = ClusteredKeys(base, labels, args.dim, seed=args.seed)
    queries = gen.queries(args.queries)
    print(f"keys: {len(base)} real MiniLM keys of BBC News, clustered synthetic keys of dimension {args.dim}; "
          f"{args.queries} queries, k={K}, {args.threads} threads; caps {args.max_memory_gb:g} GiB, "
          f"{args.max_minutes:g} min")
    print(f"MiniLM forward pass: {reference['batch1_ms']:.1f} ms at batch 1, {reference['batch32_ms']:.1f} ms per "
          "example at batch 32")
    header = (f"{'size':>8} {'index':<10} {'factory':<34} {'build s':>8} {'peak GiB':>8} {'disk GB':>8} "
              f"{'b1 ms':>7} {'b1 cpu':>7} {'b256 ms':>8} {'recall@12':>9} {'share b1':>8} {'share b256':>10}")
    print(header, flush=True)
    results, seconds_per_key = [], {}
    if args.previous:  # build seconds per key of the largest size each index ran at
        for old in sorted(json.loads(Path(args.previous).read_text())["results"], key=lambda r: r["size"]):
            if "build_s" in old:
                seconds_per_key[old["index"]] = old["build_s"] / old["size"]
    for size in map(parse_size, args.sizes):
        truth_path = None
        for name in args.indexes:
            spec = index_specs(size, args.dim)[name]
            need = estimate(name, spec, size, args.dim)
            free = shutil.disk_usage(workdir).free
            predicted = seconds_per_key.get(name, 0.0) * size * (1.3 if name == "hnsw-pq" else 1.0)
            skip = None
            if need["memory"] > args.max_memory_gb * 2**30:
                skip = f"needs ~{need['memory'] / 2**30:.1f} GiB of memory > cap {args.max_memory_gb:g} GiB"
            elif need["disk"] > 0.8 * free:
                skip = f"needs ~{need['disk'] / 1e9:.0f} GB of disk, {free / 1e9:.0f} GB free"
            elif predicted > 60 * args.max_minutes:
                skip = f"would take ~{predicted / 60:.0f} min (build time per key of a smaller size) > cap {args.max_minutes:g} min"
            if skip:
                print(f"{size:>8} {name:<10} skipped: {skip}", flush=True)
                results.append({"size": size, "index": name, "skipped": skip})
                continue
            if truth_path is None:
                exact_neighbours(gen, size, queries, workdir)
                truth_path = workdir / f"exact-{size}-{args.dim}-{len(queries)}-{args.seed}.npy"
            child = {"workdir": str(workdir), "size": size, "dim": args.dim, "name": name, "retriever": spec,
                     "queries": args.queries, "threads": args.threads, "seed": args.seed, "keep": args.keep,
                     "truth": str(truth_path)}
            out = run_in_child(child, args.max_memory_gb * 2**30, 60 * args.max_minutes)
            out = {"size": size, "index": name, **out}
            results.append(out)
            if "stopped" in out:
                print(f"{size:>8} {name:<10} stopped: {out['stopped']}", flush=True)
                shutil.rmtree(workdir / f"db-{size}-{args.dim}-{name}", ignore_errors=True)
                continue
            seconds_per_key[name] = out["build_s"] / size
            out["share_b1"] = out["batch1_ms"] / (out["batch1_ms"] + reference["batch1_ms"])
            out["share_b256"] = out["batch256_ms"] / (out["batch256_ms"] + reference["batch32_ms"])
            print(f"{size:>8} {name:<10} {out['factory']:<34} {out['build_s']:>8.0f} {out['peak_rss_gb']:>8.2f} "
                  f"{out['disk_gb']:>8.2f} {out['batch1_ms']:>7.3f} {out['batch1_cpu_ms']:>7.3f} "
                  f"{out['batch256_ms']:>8.3f} {out['recall']:>9.3f} {out['share_b1']:>7.1%} {out['share_b256']:>9.1%}",
                  flush=True)
            for point in out["sweep"]:
                knobs = f"nprobe={point['nprobe']}" + (f" k_factor={point['k_factor']}" if point["k_factor"] else "")
                print(f"{'':>8} {'':<10}   {knobs:<32} {'':>26} {point['batch1_ms']:>7.3f} "
                      f"{point['batch1_cpu_ms']:>7.3f} {point['batch256_ms']:>8.3f} {point['recall']:>9.3f}", flush=True)
            save(args, reference, results)  # after every result: a long run cut short keeps what it measured
    save(args, reference, results)


def save(args: argparse.Namespace, reference: dict[str, float], results: list[dict[str, Any]]) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps({"reference": reference, "args": vars(args), "results": results},
                                              indent=2))
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(results))


def markdown_table(results: list[dict[str, Any]]) -> str:
    """The results as a markdown table (skipped and stopped runs say why)."""
    lines = ["| keys | index (FAISS factory, search knobs) | build s | peak RSS GiB | disk GB | batch-1 ms/query "
             "(wall / CPU) | batch-256 ms/query | recall@12 | retrieval share b1 / b256 |", "|" + " --- |" * 9]
    for r in results:
        size = f"{r['size'] / 1e6:g}M" if r["size"] >= 10**6 else f"{r['size'] // 1000}k"
        if "build_s" not in r:
            lines.append(f"| {size} | {r['index']} | {r.get('skipped') or r.get('stopped')} |" + " |" * 6)
            continue
        knobs = ", ".join(f"{k}={v}" for k, v in r.get("knobs", {}).items() if v is not None)
        lines.append(f"| {size} | {r['index']} (`{r['factory']}`{', ' + knobs if knobs else ''}) | {r['build_s']:.0f} | "
                     f"{r['peak_rss_gb']:.2f} | {r['disk_gb']:.2f} | {r['batch1_ms']:.2f} / {r['batch1_cpu_ms']:.2f} | "
                     f"{r['batch256_ms']:.2f} | {r['recall']:.3f} | {r['share_b1']:.1%} / {r['share_b256']:.1%} |")
    sweeps = [r for r in results if r.get("sweep")]
    if sweeps:
        lines += ["", "| keys | index | nprobe | k_factor | batch-1 ms/query (wall / CPU) | batch-256 ms/query | "
                  "recall@12 |", "|" + " --- |" * 7]
        for r in sweeps:
            size = f"{r['size'] / 1e6:g}M" if r["size"] >= 10**6 else f"{r['size'] // 1000}k"
            for p in r["sweep"]:
                lines.append(f"| {size} | {r['index']} | {p['nprobe']} | {p['k_factor'] or '-'} | {p['batch1_ms']:.2f} / "
                             f"{p['batch1_cpu_ms']:.2f} | {p['batch256_ms']:.2f} | {p['recall']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
