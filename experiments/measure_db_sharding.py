"""Measure exit-database builds in parts and resumed builds with the real entry points, and check that
they give the one-process database (docs/results/db_sharding.md).

Each command runs as its own process and is timed by wall clock; the machine's load average is
recorded beside every timing (timings on a shared machine are noisy: re-run on a quiet one).

    # BBC News, MiniLM + prototype head (the default config): 1 part, then 4 parts through joblib (2 jobs)
    python experiments/measure_db_sharding.py parts --name bbcnews --parts 4
    # SmolLM2-135M on Rotten Tomatoes (raee_lm's setup: prompt head, MiniLM sentence keys, 1000-row database)
    python experiments/measure_db_sharding.py parts --name smollm2_rt --parts 2 -- \\
        +experiment=raee_lm backbone=smollm2 data=rotten_tomatoes
    # a one-part BBC News build killed about half way (SIGKILL), then resumed
    python experiments/measure_db_sharding.py resume --name bbcnews
    # the one-part build alone, with one torch thread (after parts: compares with its database)
    python experiments/measure_db_sharding.py one --name bbcnews --threads 1
    # the results page's tables from what was measured
    python experiments/measure_db_sharding.py tables

``parts`` first builds a small warm-up database (fits and caches the head, loads the weights once), then
the database in one process, then the parts (``-m hydra/launcher=joblib hydra.launcher.n_jobs=<jobs>
db.part=... db.parts=<parts>``) and the merge (``db.merge=true``); it compares the two databases (content
hash, every table, the neighbours of every stored key under exact search) and RAEE's predictions and exit
layers on the test split (``python -m raee.run exit=raee db.dir=...`` for each). ``resume`` times an
uninterrupted build, a build killed when half its shards are done, and the resumed build, and compares the
resumed database with the uninterrupted one. Rows are appended to <out>/measurements.csv; <out>/provenance.json
records each command's provenance (raee.provenance's format: command, commit, times, load, machine, versions).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's raee (the comparisons import it)
COLUMNS = ("setup", "measurement", "parts", "jobs", "command", "seconds", "cpu_seconds", "rows", "shards",
           "content_hash", "identical", "load_start", "load_end", "note")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class CpuMeter:
    """CPU seconds (user + system) of a process and every process under it (joblib's workers, the ranks),
    sampled by psutil every half second until :meth:`stop`; a process that ends between two samples loses
    at most its last half second."""

    def __init__(self, pid: int) -> None:
        import threading

        import psutil

        self.root, self.seen, self.done = psutil.Process(pid), {}, threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        import psutil

        while not self.done.wait(0.5):
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                continue
            for process in processes:
                try:
                    times = process.cpu_times()
                    self.seen[(process.pid, process.create_time())] = times.user + times.system
                except psutil.Error:
                    pass

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return sum(self.seen.values())


def run(args: list[str], log: Path, cwd: Path, note: str = "", env: dict[str, str] | None = None
        ) -> tuple[float, str, str]:
    """One command in its own process (nice 10), its output appended to ``log``: (seconds, load before, after).
    The command's CPU seconds (all its processes, joblib's workers included) go to ``LAST_CPU``, its
    provenance step to ``STEPS``."""
    from raee.provenance import _now, load_average, step_record

    before, load_start, start_time, commit = load(), load_average(), _now(), code_commit()
    started = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {shlex.join(args)}\n")
        f.flush()
        proc = subprocess.Popen(["nice", "-n", "10", *args], cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                                env=ENV | (env or {}))
        meter = CpuMeter(proc.pid)
        proc.wait()
    seconds = time.perf_counter() - started
    LAST_CPU[0] = meter.stop()
    prefix = [f"{k}={v}" for k, v in (env or {}).items()]
    STEPS.append(step_record(shlex.join([*prefix, "nice", "-n", "10", *args]), start_time, load_start, seconds,
                             proc.returncode, cwd=cwd, commit=commit)
                 | {"cpu_seconds": round(LAST_CPU[0], 1), "note": note})
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {shlex.join(args)}; see {log}")
    return seconds, before, load()


LAST_CPU = [0.0]
STEPS: list[dict[str, Any]] = []
ENV = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))


def build_db(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "raee.build_db", *overrides]


def meta(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "meta.json").read_text())


def compare_databases(a: Path, b: Path) -> dict[str, Any]:
    """Tables row for row, keys, and the 12 nearest neighbours of every stored key (exact search)."""
    import numpy as np
    import torch

    from raee.database import ExitDatabase

    x, y = ExitDatabase.load(a), ExitDatabase.load(b)
    tables = {name: bool(torch.equal(getattr(x.info, name).tensor(), getattr(y.info, name).tensor()))
              for name in ("preds", "probs", "correct", "labels")}
    tables["ids"] = bool(torch.equal(x.ids.tensor(), y.ids.tensor()))
    keys = x.keys.tensor().numpy() if x.keys is not None else None
    same_keys = keys is not None and y.keys is not None and bool(np.array_equal(keys, y.keys.tensor().numpy()))
    neighbours = None
    if keys is not None:
        neighbours = bool(np.array_equal(x.retriever.search(keys, 12)[1], y.retriever.search(keys, 12)[1]))
    return {"rows": x.size, "tables_equal": tables, "keys_equal": same_keys, "neighbours_equal": neighbours,
            "content_hash_equal": x.meta["content_hash"] == y.meta["content_hash"]}


def predictions(run_dir: Path) -> list[list[str]]:
    with open(run_dir / "predictions.csv") as f:
        return list(csv.reader(f))


def write_rows(out: Path, rows: list[dict[str, Any]]) -> None:
    path = out / "measurements.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def code_commit() -> tuple[str | None, bool | None]:
    """The commit of the code that runs (a copy made with git archive names it in COMMIT)."""
    from raee.provenance import git_commit

    commit, dirty = git_commit(REPO)
    if commit is None and (REPO / "COMMIT").exists():
        commit, dirty = (REPO / "COMMIT").read_text().strip(), False
    return commit, dirty


def provenance(out: Path, setup: str, kind: str, comparison: dict[str, Any]) -> None:
    """Add this measurement's commands (:data:`STEPS`) to <out>/provenance.json (raee.provenance's format 1),
    and what the comparison found under ``comparisons``."""
    from raee.provenance import FILE, FORMAT

    path = out / FILE
    record = json.loads(path.read_text()) if path.exists() else {
        "format": FORMAT, "experiment": out.name, "status": "measured", "steps": [],
        "note": "each step is one command of experiments/measure_db_sharding.py, run as its own process with "
                "nice -n 10 on a machine shared with other jobs (see each step's load_average); the script: "
                + shlex.join(["python", "experiments/measure_db_sharding.py", *sys.argv[1:]])}
    record["steps"] += STEPS
    record.setdefault("comparisons", {})[f"{setup} {kind}"] = comparison
    path.write_text(json.dumps(record, indent=2) + "\n")


def measure_parts(args: argparse.Namespace, overrides: list[str]) -> None:
    work, out, log = args.work / args.name, args.out, args.log
    work.mkdir(parents=True, exist_ok=True)
    common = [*overrides, f"paths.cache_dir={args.cache_dir}", "logger=none", "hydra.output_subdir=null",
              f"hydra.run.dir={work / 'hydra'}"]
    rows: list[dict[str, Any]] = []

    def step(measurement: str, cmd: list[str], parts: int, jobs: int = 1) -> float:
        seconds, before, after = run(cmd, log, work, note=f"{args.name}: {measurement}")
        rows.append({"setup": args.name, "measurement": measurement, "parts": parts, "jobs": jobs,
                     "command": shlex.join(cmd), "seconds": round(seconds, 1), "cpu_seconds": round(LAST_CPU[0], 1),
                     "load_start": before, "load_end": after})
        print(f"{measurement}: {seconds:.1f} s, {LAST_CPU[0]:.1f} CPU s (load {before} -> {after})", flush=True)
        return seconds

    step("warm-up (head fit, small database)", build_db(*common, f"db.dir={work / 'warmup'}", "db.fraction=0.02"), 1)
    one = work / "one"
    step("build in 1 part", build_db(*common, f"db.dir={one}", "db.rebuild=true"), 1)
    many = work / f"parts{args.parts}"
    # exit=raee: an experiment config's own sweep over exit methods (raee_lm) would multiply the jobs
    sweep = [*overrides, "exit=raee", f"paths.cache_dir={args.cache_dir}", "logger=none",
             f"hydra.sweep.dir={work / 'sweep'}"]
    parts_s = step(f"build in {args.parts} parts (joblib, {args.jobs} jobs)",
                   build_db("-m", *sweep, "hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.jobs}",
                            f"db.part={','.join(map(str, range(args.parts)))}", f"db.parts={args.parts}",
                            f"db.dir={many}", "db.rebuild=true"), args.parts, args.jobs)
    merge_s = step("merge", build_db(*common, f"db.dir={many}", "db.merge=true"), args.parts)
    rows.append({"setup": args.name, "measurement": f"build in {args.parts} parts + merge", "parts": args.parts,
                 "jobs": args.jobs, "command": "the two commands above", "seconds": round(parts_s + merge_s, 1),
                 "cpu_seconds": round(rows[-2]["cpu_seconds"] + rows[-1]["cpu_seconds"], 1)})
    same = compare_databases(one, many)
    evals = {}
    for name, directory in (("one", one), ("parts", many)):
        run_dir = work / f"eval-{name}"
        cmd = [sys.executable, "-m", "raee.run", *overrides, "exit=raee", f"db.dir={directory}",
               f"paths.cache_dir={args.cache_dir}", "logger=none", "compare_full=false", "compare_oracle=false",
               f"hydra.run.dir={run_dir}", "redo=true"]
        step(f"RAEE on the test split with the {name} database", cmd, 1)
        evals[name] = predictions(run_dir)
    same["raee_predictions_equal"] = evals["one"] == evals["parts"]
    summary = json.loads((work / "eval-one" / "summary.json").read_text())
    same["raee"] = {k: summary.get(k) for k in ("num_examples", "accuracy", "mean_exit_layer")}
    identical = (same["content_hash_equal"] and all(same["tables_equal"].values()) and same["raee_predictions_equal"]
                 and same["neighbours_equal"] is not False)
    m = meta(many)
    for row in rows:
        row.update(rows=m["count"], shards=len(m["shards"]), content_hash=m["content_hash"][:16],
                   identical=identical)
    write_rows(out, rows)
    provenance(out, args.name, f"in {args.parts} parts", same)
    print(json.dumps(same, indent=2))


def measure_one(args: argparse.Namespace, overrides: list[str]) -> None:
    """The one-process build again, with ``--threads`` torch threads (OMP_NUM_THREADS)."""
    work, out, log = args.work / args.name, args.out, args.log
    work.mkdir(parents=True, exist_ok=True)
    common = [*overrides, f"paths.cache_dir={args.cache_dir}", "logger=none", "hydra.output_subdir=null",
              f"hydra.run.dir={work / 'hydra'}"]
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    measurement = f"build in 1 part, {args.threads or 'default'} thread(s)"
    cmd = build_db(*common, f"db.dir={work / 'one-threads'}", "db.rebuild=true")
    seconds, before, after = run(cmd, log, work, f"{args.name}: {measurement}", env)
    m = meta(work / "one-threads")
    same = {"content_hash_equal": (work / "one").exists() and meta(work / "one")["content_hash"] == m["content_hash"]}
    write_rows(out, [{"setup": args.name, "measurement": measurement, "parts": 1, "jobs": 1,
                      "command": shlex.join([*(f"{k}={v}" for k, v in env.items()), *cmd]),
                      "seconds": round(seconds, 1),
                      "cpu_seconds": round(LAST_CPU[0], 1), "rows": m["count"], "shards": len(m["shards"]),
                      "content_hash": m["content_hash"][:16], "identical": same["content_hash_equal"],
                      "load_start": before, "load_end": after}])
    provenance(out, args.name, measurement, same)
    print(f"{measurement}: {seconds:.1f} s, {LAST_CPU[0]:.1f} CPU s (load {before} -> {after}); {same}")


def measure_resume(args: argparse.Namespace, overrides: list[str]) -> None:
    work, out, log = args.work / f"{args.name}-resume", args.out, args.log
    work.mkdir(parents=True, exist_ok=True)
    common = [*overrides, f"paths.cache_dir={args.cache_dir}", "logger=none", "hydra.output_subdir=null",
              f"hydra.run.dir={work / 'hydra'}"]
    rows: list[dict[str, Any]] = []

    def record(measurement: str, cmd: list[str], seconds: float, before: str, after: str, note: str = "") -> None:
        rows.append({"setup": args.name, "measurement": measurement, "parts": 1, "jobs": 1, "command": shlex.join(cmd),
                     "seconds": round(seconds, 1), "cpu_seconds": round(LAST_CPU[0], 1), "load_start": before,
                     "load_end": after, "note": note})
        print(f"{measurement}: {seconds:.1f} s (load {before} -> {after}) {note}", flush=True)

    warm = build_db(*common, f"db.dir={work / 'warmup'}", "db.fraction=0.02")
    record("warm-up (head fit, small database)", warm, *run(warm, log, work, f"{args.name}: warm-up"))
    whole = work / "uninterrupted"
    cmd = build_db(*common, f"db.dir={whole}", "db.rebuild=true")
    full_s, before, after = run(cmd, log, work, f"{args.name}: uninterrupted build")
    record("uninterrupted build", cmd, full_s, before, after)
    target = work / "resumed"
    cmd = build_db(*common, f"db.dir={target}", "db.rebuild=true")
    progress = work / "resumed.parts" / "progress.log"
    total = len(meta(whole)["shards"])
    from raee.provenance import _now, load_average, step_record

    before, started = load(), time.perf_counter()
    load_start, start_time, commit = load_average(), _now(), code_commit()
    with open(log, "a") as f:
        f.write(f"\n$ {shlex.join(cmd)}  (killed when {total // 2} of {total} shards are done)\n")
        f.flush()
        proc = subprocess.Popen(["nice", "-n", "10", *cmd], cwd=work, stdout=f, stderr=subprocess.STDOUT, env=ENV,
                                start_new_session=True)
        meter = CpuMeter(proc.pid)
        while proc.poll() is None:
            done = progress.read_text().count(" done: ") if progress.exists() else 0
            if done >= total // 2:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.2)
        proc.wait()
    killed_s = time.perf_counter() - started
    LAST_CPU[0] = meter.stop()
    STEPS.append(step_record(shlex.join(["nice", "-n", "10", *cmd]), start_time, load_start, killed_s,
                             proc.returncode, cwd=work, commit=commit)
                 | {"cpu_seconds": round(LAST_CPU[0], 1),
                    "note": f"{args.name}: the same build killed (SIGKILL) when half its shards were done"})
    done = len(list((work / "resumed.parts").glob("part-0-of-1/shards/*/shard.json")))
    record("build killed about half way", cmd, killed_s, before, load(), f"{done} of {total} shards complete")
    resume = build_db(*common, f"db.dir={target}")
    resume_s, before, after = run(resume, log, work, f"{args.name}: the killed build resumed")
    record("resumed build", resume, resume_s, before, after, f"time saved against a restart: {full_s - resume_s:.1f} s")
    same = compare_databases(whole, target)
    identical = same["content_hash_equal"] and all(same["tables_equal"].values())
    m = meta(target)
    for row in rows:
        row.update(rows=m["count"], shards=len(m["shards"]), content_hash=m["content_hash"][:16], identical=identical)
    write_rows(out, rows)
    provenance(out, args.name, "resumed", same | {"shards_done_at_kill": done, "shards": total})
    print(json.dumps(same, indent=2))


SETUPS = {"bbcnews": "BBC News (MiniLM + prototype head)", "smollm2_rt": "SmolLM2-135M, Rotten Tomatoes (raee_lm)"}


def yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def same_database(comparison: dict[str, Any]) -> bool:
    return bool(comparison["content_hash_equal"] and all(comparison["tables_equal"].values())
                and comparison["neighbours_equal"] is not False)


def write_tables(out: Path) -> None:
    """builds.csv and resume.csv (the results page's tables) from <out>/measurements.csv and the comparisons in
    <out>/provenance.json; where a measurement was repeated, its last row counts."""
    with open(out / "measurements.csv") as f:
        last = {(r["setup"], r["measurement"]): r for r in csv.DictReader(f)}
    comparisons = json.loads((out / "provenance.json").read_text())["comparisons"]

    def row(setup: str, measurement: str) -> dict[str, str]:
        return last[(setup, measurement)]

    def secs(value: str) -> str:
        return f"{float(value):.0f}" if value else ""

    builds = []
    order = list(SETUPS)
    for key, comparison in sorted(comparisons.items(), key=lambda kv: order.index(kv[0].split()[0])
                                  if kv[0].split()[0] in order else len(order)):
        setup, _, kind = key.partition(" ")
        if not kind.startswith("in ") or setup not in SETUPS:
            continue
        parts = int(kind.split()[1])
        one, total, merge = (row(setup, m) for m in ("build in 1 part", f"build in {parts} parts + merge", "merge"))
        builds.append({"setup": SETUPS[setup], "build": "one process", "rows": one["rows"], "shards": one["shards"],
                       "wall_s": secs(one["seconds"]), "cpu_s": secs(one["cpu_seconds"]), "merge_s": "",
                       "same_database": "(reference)", "same_raee": "(reference)"})
        for label, measurement in (("one process, 1 thread", "build in 1 part, 1 thread(s)"),
                                   ("one process (again, just after)", "build in 1 part, default thread(s)")):
            if (setup, measurement) in last:
                r = row(setup, measurement)
                builds.append({"setup": SETUPS[setup], "build": label, "rows": r["rows"], "shards": r["shards"],
                               "wall_s": secs(r["seconds"]), "cpu_s": secs(r["cpu_seconds"]), "merge_s": "",
                               "same_database": yes(r["identical"] == "True"), "same_raee": ""})
        builds.append({"setup": SETUPS[setup], "build": f"{parts} parts (joblib, 2 at a time) + merge",
                       "rows": total["rows"], "shards": total["shards"], "wall_s": secs(total["seconds"]),
                       "cpu_s": secs(total["cpu_seconds"]), "merge_s": secs(merge["seconds"]),
                       "same_database": yes(same_database(comparison)),
                       "same_raee": f"{yes(comparison['raee_predictions_equal'])} "
                                    f"({comparison['raee']['num_examples']} test examples)"})
    with open(out / "builds.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(builds[0]))
        writer.writeheader()
        writer.writerows(builds)
    comparison = comparisons["bbcnews resumed"]
    total, done = comparison["shards"], comparison["shards_done_at_kill"]
    whole = float(row("bbcnews", "uninterrupted build")["seconds"])
    with open(out / "resume.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["run", "shards", "wall_s", "cpu_s", "saved_s", "same_database"])
        writer.writeheader()
        for label, measurement, shards in (("uninterrupted", "uninterrupted build", f"{total} of {total}"),
                                           ("killed when half its shards were done", "build killed about half way",
                                            f"{done} of {total} (then killed)"),
                                           ("resumed", "resumed build", f"{total - done} of {total}")):
            r = row("bbcnews", measurement)
            writer.writerow({"run": label, "shards": shards, "wall_s": secs(r["seconds"]),
                             "cpu_s": secs(r["cpu_seconds"]),
                             "saved_s": f"{whole - float(r['seconds']):.0f}" if label == "resumed" else "",
                             "same_database": yes(same_database(comparison)) if label == "resumed" else ""})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("parts", "resume", "one", "tables"),
                        help="parts: 1 part vs --parts parts; resume: killed and resumed; one: the 1-part build "
                             "alone; tables: builds.csv and resume.csv (the results page) from --out's measurements")
    parser.add_argument("--name", default=None, help="a name for this setup (rows and work folders)")
    parser.add_argument("--parts", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=2, help="joblib processes running the parts")
    parser.add_argument("--threads", type=int, default=None, help="one: OMP_NUM_THREADS of the build")
    parser.add_argument("--work", type=Path, default=Path("/work/cache/db_sharding"), help="databases go here")
    parser.add_argument("--cache-dir", default="/work/cache", help="paths.cache_dir (fitted heads)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "db_sharding")
    parser.add_argument("--log", type=Path, default=None, help="the commands' output (default <work>/<name>.log)")
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []  # Hydra overrides of the setup, after --
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.work = args.work.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    args.log = (args.log or args.work / f"{args.name}-{args.what}.log").resolve()
    if args.what == "tables":
        write_tables(args.out)
        return
    if not args.name:
        parser.error(f"{args.what} needs --name")
    {"parts": measure_parts, "resume": measure_resume, "one": measure_one}[args.what](args, overrides)


if __name__ == "__main__":
    main()
