"""Provenance of a published result: which command made it, from which commit, when, on what machine.

Every folder under ``results/`` holds a report's ``results.csv`` and beside it ``provenance.json``, written by

    python -m raee.provenance results/<experiment> -- <command ...>

which runs the command and records it (appending a step when the file exists, so a sweep and its report
make one record). The file (format 1)::

    {"format": 1, "experiment": "default", "status": "measured" | "transcribed",
     "steps": [{"command": "python -m raee.run -m ...", "cwd": "...", "commit": "<sha>", "dirty": false,
                "started": "<UTC ISO time>", "finished": "...", "seconds": 71.2, "returncode": 0,
                "load_average": {"start": [1, 5, 15 min], "end": [...]},
                "machine": {"cpu_model": "...", "cores": 2, "memory_gib": 23.4, "platform": "...", "python": "3.11.2"},
                "versions": {"torch": "...", "transformers": "...", "faiss": "...", "raee": "..."},
                "environment": {"OMP_NUM_THREADS": "1", ...}}],
     "raw_outputs": "multirun/default (not in git)", "note": "..."}

``status: transcribed`` marks a result moved in from an older document: its steps hold what that document
said (command, commit, date, load) and ``source`` names the document; nothing in it was re-measured.
Dates, commits and load averages live here, never in the docs' prose.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from raee.atomic import atomic_write_text
from raee.errors import UserError

FORMAT = 1
FILE = "provenance.json"
STATUSES = ("measured", "transcribed")
#: keys every provenance.json carries (checked by :func:`check_provenance` and the docs test)
REQUIRED = ("format", "experiment", "status", "steps")
REQUIRED_STEP = ("command", "commit", "started")
#: environment variables that change what a run measures; recorded when set
ENVIRONMENT = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "CUDA_VISIBLE_DEVICES", "WANDB_MODE",
               "HF_HUB_OFFLINE", "RAEE_REAL_LM")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; else platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages ([] where the platform has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, platform and Python of this machine."""
    info: dict[str, Any] = {"cpu_model": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version()}
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return info


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict[str, str | None]:
    """Installed versions of the packages a measurement depends on (None: not installed)."""
    return {"raee": _version("raee"), "torch": _version("torch"), "transformers": _version("transformers"),
            "faiss": _version("faiss-cpu", "faiss-gpu", "faiss"), "numpy": _version("numpy"),
            "lightning": _version("lightning")}


def git_commit(cwd: str | Path = ".") -> tuple[str | None, bool | None]:
    """(HEAD's full commit id, whether tracked files differ from it); (None, None) outside a git checkout.
    Changes under results/ do not count: a result being written there is not a change to the code."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"],
                                cwd=cwd, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return sha.stdout.strip(), bool(status.stdout.strip())


def step_record(command: str, started: str, load_start: Sequence[float], seconds: float | None = None,
                returncode: int | None = None, cwd: str | Path = ".",
                commit: tuple[str | None, bool | None] | None = None) -> dict[str, Any]:
    """One step of a provenance record: the command and everything about where and when it ran
    (``commit``: (id, dirty) read when the command started; read now when not given)."""
    commit, dirty = git_commit(cwd) if commit is None else commit
    return {"command": command, "cwd": str(Path(cwd).resolve()), "commit": commit, "dirty": dirty,
            "started": started, "finished": _now(), "seconds": None if seconds is None else round(seconds, 1),
            "returncode": returncode, "load_average": {"start": list(load_start), "end": load_average()},
            "machine": machine(), "versions": versions(),
            "environment": {k: os.environ[k] for k in ENVIRONMENT if k in os.environ}}


def read_provenance(path: str | Path) -> dict[str, Any]:
    """A provenance.json (a folder is read as folder/provenance.json), checked by :func:`check_provenance`."""
    path = Path(path)
    path = path / FILE if path.is_dir() else path
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise UserError(f"no {path}: write it with `python -m raee.provenance {path.parent} -- <command>`") from err
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); fix or rewrite it") from err
    problems = check_provenance(record)
    if problems:
        raise UserError(f"{path}: " + "; ".join(problems))
    return record


def check_provenance(record: Any) -> list[str]:
    """What is missing or wrong in a provenance record ([] when it is complete)."""
    if not isinstance(record, dict):
        return ["not a JSON object"]
    problems = [f"missing '{k}'" for k in REQUIRED if k not in record]
    if record.get("status") not in STATUSES:
        problems.append(f"status must be one of {', '.join(STATUSES)}, got {record.get('status')!r}")
    if record.get("status") == "transcribed" and not record.get("source"):
        problems.append("a transcribed result names its 'source' (the document it was moved in from)")
    steps = record.get("steps")
    if not isinstance(steps, list) or not steps:
        problems.append("'steps' must be a non-empty list")
    else:
        for i, step in enumerate(steps):
            missing = [k for k in REQUIRED_STEP if not isinstance(step, dict) or k not in step]
            if missing:
                problems.append(f"step {i} lacks {', '.join(missing)}")
    return problems


def run_and_record(folder: str | Path, command: Sequence[str], experiment: str | None = None, note: str | None = None,
                   raw_outputs: str | None = None, fresh: bool = False) -> int:
    """Run ``command`` and add a step to ``folder``/provenance.json (created when absent or ``fresh``);
    returns the command's exit status. The record is written even when the command fails (its
    returncode says so), and atomically: an interrupted run leaves the previous record."""
    folder = Path(folder)
    path = folder / FILE
    record: dict[str, Any]
    if path.exists() and not fresh:
        record = read_provenance(path)
        if record["status"] != "measured":
            raise UserError(f"{path} records a transcribed result: pass --fresh to replace it with a measured one")
    else:
        record = {"format": FORMAT, "experiment": experiment or folder.name, "status": "measured", "steps": []}
    # the code that runs is the code at the start: later commits during a long run must not be credited
    started, load_start, commit, clock = _now(), load_average(), git_commit(), time.monotonic()
    print(f"provenance: running {shlex.join(command)}", file=sys.stderr, flush=True)
    try:
        returncode = subprocess.call(list(command))
    except FileNotFoundError as err:
        raise UserError(f"cannot run {command[0]!r}: {err}") from err
    record["steps"].append(step_record(shlex.join(command), started, load_start, time.monotonic() - clock, returncode,
                                       commit=commit))
    if experiment:
        record["experiment"] = experiment
    if note is not None:
        record["note"] = note
    if raw_outputs is not None:
        record["raw_outputs"] = raw_outputs
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    print(f"provenance: step {len(record['steps'])} recorded in {path} (exit status {returncode})", file=sys.stderr)
    return returncode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m raee.provenance",
        usage="python -m raee.provenance FOLDER [options] -- COMMAND ...",
        description="Run a command and record its provenance (command, commit, date, machine, load average at "
                    "start and end, package versions) in FOLDER/provenance.json; a second call adds a step.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n"
               "  python -m raee.provenance results/default --raw-outputs 'multirun/default (not in git)' -- \\\n"
               "      python -m raee.run -m exit=full,entropy,raee hydra.sweep.dir=multirun/default\n"
               "  python -m raee.provenance results/default -- python -m raee.report multirun/default --out results/default\n"
               "  python -m raee.report --docs     # then regenerate the docs' tables from results/")
    parser.add_argument("folder", metavar="FOLDER", help="the result's folder, e.g. results/pareto")
    parser.add_argument("--experiment", default=None, help="the experiment's name (default: the folder's name)")
    parser.add_argument("--note", default=None, help="a sentence stored with the record")
    parser.add_argument("--raw-outputs", default=None, help="where the raw run directories are (or 'not kept')")
    parser.add_argument("--fresh", action="store_true", help="start a new record instead of adding a step")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args, command = build_parser().parse_args(argv[:split]), argv[split + 1:]
    if not command:
        print("error: give the command after --, e.g. python -m raee.provenance results/x -- python -m raee.run",
              file=sys.stderr)
        return 2
    try:
        return run_and_record(args.folder, command, args.experiment, args.note, args.raw_outputs, args.fresh)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
