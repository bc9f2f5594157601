"""The build-once cache: parallel processes build an entry once, dead builds leave nothing loadable,
damaged automatic entries are rebuilt and damaged user-named ones refused."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from raee.cache import BUILDING, load_or_build


def _build_slowly(directory: Path, log: Path, seconds: float = 0.5) -> None:
    with open(log, "a") as f:  # one line per build, whichever process ran it
        f.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    (directory / "value.json").write_text(json.dumps({"built_by": os.getpid()}))


def _load(directory: Path) -> dict:
    return json.loads((directory / "value.json").read_text())


def _worker(target: str, log: str, out: str) -> None:
    value = load_or_build(Path(target), lambda d: _build_slowly(d, Path(log)), _load)
    Path(out).write_text(json.dumps(value))


def test_racing_processes_build_once_and_read_the_same_entry(tmp_path):
    target, log = tmp_path / "entry", tmp_path / "builds.log"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(target), str(log), str(tmp_path / f"out{i}.json")))
             for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(log.read_text().split()) == 1  # one build for three processes
    values = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(3)]
    assert values[0] == values[1] == values[2] == _load(target)
    assert not list(tmp_path.glob(f".entry.{BUILDING}*"))


def _die_while_building(target: str, log: str) -> None:
    def build(directory: Path) -> None:
        (directory / "value.json").write_text("{\"half\": ")  # half written, then the process dies
        os.kill(os.getpid(), signal.SIGKILL)

    load_or_build(Path(target), build, _load)


def test_a_process_killed_mid_build_leaves_nothing_that_loads(tmp_path):
    target, log = tmp_path / "entry", tmp_path / "builds.log"
    proc = mp.get_context("spawn").Process(target=_die_while_building, args=(str(target), str(log)))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    assert not target.exists()  # only the hidden building directory is left
    assert list(tmp_path.glob(f".entry.{BUILDING}*"))
    # the next process takes the (released) lock, clears the dead build and builds a complete entry
    value = load_or_build(target, lambda d: _build_slowly(d, log, 0.0), _load)
    assert value == _load(target)
    assert not list(tmp_path.glob(f".entry.{BUILDING}*"))


def test_a_damaged_automatic_entry_is_rebuilt_with_a_warning(tmp_path):
    target, log = tmp_path / "entry", tmp_path / "builds.log"
    load_or_build(target, lambda d: _build_slowly(d, log, 0.0), _load)
    (target / "value.json").write_text("{not json")
    with pytest.warns(UserWarning, match="damaged"):
        value = load_or_build(target, lambda d: _build_slowly(d, log, 0.0), _load)
    assert value == _load(target)
    assert len(log.read_text().split()) == 2


def test_a_damaged_user_named_entry_is_refused(tmp_path):
    target, log = tmp_path / "entry", tmp_path / "builds.log"
    load_or_build(target, lambda d: _build_slowly(d, log, 0.0), _load)
    (target / "value.json").write_text("{not json")
    with pytest.raises(json.JSONDecodeError):
        load_or_build(target, lambda d: _build_slowly(d, log, 0.0), _load, auto=False)
    assert len(log.read_text().split()) == 1


def test_a_failed_build_leaves_no_entry_and_raises(tmp_path):
    def fail(directory: Path) -> None:
        (directory / "value.json").write_text("{}")
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        load_or_build(tmp_path / "entry", fail, _load)
    assert not (tmp_path / "entry").exists()
    assert not list(tmp_path.glob(f".entry.{BUILDING}*"))


def test_rebuild_replaces_a_good_entry(tmp_path):
    target, log = tmp_path / "entry", tmp_path / "builds.log"
    load_or_build(target, lambda d: _build_slowly(d, log, 0.0), _load)
    load_or_build(target, lambda d: _build_slowly(d, log, 0.0), _load, rebuild=True)
    assert len(log.read_text().split()) == 2
