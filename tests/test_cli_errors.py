"""A user's error ends a command as one paragraph, ``error: <message>``, with status 2 and no traceback; a bug
keeps its traceback; HYDRA_FULL_ERROR=1 or log_level=DEBUG show the traceback of every error.

The bad inputs are those the library tests check (tests/test_data.py, test_database.py, test_backbones.py,
...), here through the commands a user types: ``raee`` (raee.run), ``raee-build-db``, ``raee-report``
and an experiments/ script. The commands run in this process (sys.argv patched, SystemExit caught),
one runs as a real subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import re
import runpy
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from omegaconf.errors import MissingMandatoryValue

from raee import build_db, report, run
from raee.cli import show_tracebacks, user_error, user_message
from raee.errors import MissingFileError, UserError
from tests.test_config import TINY
from tests.test_launchers import csv_data, tiny_csv

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def restore_logging():
    """Hydra points the root logger at this test's captured stderr; the next test gets the handlers back."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in saved[0]:
            handler.close()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def call(entry: Callable[[], object], argv: list[str], monkeypatch, capsys) -> tuple[object, str]:
    """Run a command's entry point with ``argv``; (its exit status, its stderr)."""
    monkeypatch.setattr(sys, "argv", ["raee", *argv])
    with pytest.raises(SystemExit) as exit_info:
        entry()
    return exit_info.value.code, capsys.readouterr().err


def assert_user_error(status: object, stderr: str, pattern: str) -> str:
    """Status 2 and, as the last line of stderr, one ``error: ...`` paragraph matching ``pattern``; no
    traceback and no chained third-party exception anywhere."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert status == 2, stderr[-3000:]
    assert lines and lines[-1].startswith("error: "), stderr[-3000:]
    assert sum(line.startswith("error: ") for line in lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "Error in call to target" not in stderr, stderr[-3000:]
    assert not re.search(r"^\w+(Error|Exception):", stderr, re.M), f"an exception line in:\n{stderr[-3000:]}"
    assert re.search(pattern, lines[-1]), f"{pattern!r} not in {lines[-1]!r}"
    return lines[-1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def raee_run(tmp_path: Path, *overrides: str) -> list[str]:
    """``raee`` arguments for a tiny run writing under tmp_path."""
    return [*TINY, f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}", *overrides]


# ---------------------------------------------------------------------------- raee (python -m raee.run)
RUN_CASES = {
    # data
    "missing data file": (lambda t: csv_data(t / "nope.csv"),
                          r"data file file='.*nope\.csv' does not exist: check the path"),
    "wrong column": (lambda t: [*csv_data(tiny_csv(t / "t.csv")), "data.text_column=sentence"],
                     r"text_column='sentence' is not a column of .*\['text', 'label'\]: set data\.text_column"),
    "unsupported data file": (lambda t: csv_data(write(t / "data.xlsx", "text,label\n")),
                              r"unsupported file extension '\.xlsx'.*use one of"),
    "out-of-range data knob": (lambda t: ["data.val_fraction=1.5"], r"val_fraction=1\.5 is outside \(0, 1\)"),
    "config value left at ???": (lambda t: ["data=csv"], r"data\.name has no value .* data\.name="),
    # exit methods: knobs checked in the constructor (wrapped by Hydra's instantiate) and against the backbone
    "out-of-range exit knob": (lambda t: ["exit=patience", "exit.patience=0"], r"exit\.patience=0 must be at least 1"),
    "exit layer beyond the backbone": (lambda t: ["exit=fixed", "exit.layer=99"], r"exit\.layer=99 is outside 0\.\.4"),
    "unknown exit option": (lambda t: ["exit=knn", "exit.vote=mean"], r"exit\.vote='mean' is unknown: use one of"),
    "unknown calibration target": (lambda t: ["exit=entropy", "exit.target=speed"], r"exit\.target='speed' is unknown"),
    # heads and backbones
    "unknown head option": (lambda t: ["head=prompt", "head.calibration=zhao"], r"head\.calibration='zhao' is unknown"),
    "unsupported backbone": (lambda t: ["backbone.tiny.model_type=t5"], r"unsupported backbone model_type 't5'"),
    "missing backbone path": (lambda t: ["backbone=minilm", f"backbone.name_or_path={t / 'no_model'}"],
                              r"backbone path '.*no_model' does not exist: give an existing local model directory"),
    # retrieval and the exit database
    "missing exit database": (lambda t: ["exit=raee", f"db.dir={t / 'no_db'}"],
                              r"exit\.database=.*no_db does not exist: build it with `python -m raee\.build_db"),
    # the run itself
    "GPU trainer without a GPU": (lambda t: ["exit=full", "trainer=gpu"], r"No supported gpu backend.*use trainer=cpu"),
    "unknown log level": (lambda t: ["exit=full", "log_level=LOUD"], r"log_level='LOUD' is not a logging level"),
}


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_raee_prints_a_users_error_as_one_paragraph(case, tmp_path, monkeypatch, capsys):
    if case == "GPU trainer without a GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    overrides, pattern = RUN_CASES[case]
    status, stderr = call(run.cli, raee_run(tmp_path, *overrides(tmp_path)), monkeypatch, capsys)
    assert_user_error(status, stderr, pattern)


def test_full_error_and_debug_show_the_traceback_of_a_users_error(tmp_path, monkeypatch, capsys):
    for extra, env in (([], "1"), (["log_level=DEBUG"], None)):
        if env:
            monkeypatch.setenv("HYDRA_FULL_ERROR", env)
        else:
            monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
        status, stderr = call(run.cli, raee_run(tmp_path, "exit=patience", "exit.patience=0", *extra),
                              monkeypatch, capsys)
        assert status == 2 and "Traceback" in stderr, stderr[-3000:]
        assert "raee.errors.UserError: exit.patience=0 must be at least 1" in stderr
        assert stderr.rstrip().splitlines()[-1].startswith("error: exit.patience=0 must be at least 1")


def test_an_unexpected_exception_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    def bug(*args, **kwargs):
        raise RuntimeError("an unexpected bug")

    monkeypatch.setattr("raee.experiment.run_experiment", bug)
    status, stderr = call(run.cli, raee_run(tmp_path, "exit=full"), monkeypatch, capsys)
    assert status == 1 and "Traceback" in stderr and "RuntimeError: an unexpected bug" in stderr, stderr[-3000:]
    assert "error: " not in stderr


def test_a_sweep_records_a_users_error_and_logs_its_message_only(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    monkeypatch.setattr(sys, "argv", ["raee", "-m", *raee_run(tmp_path, "exit=patience", "exit.patience=0,-1"),
                                      f"hydra.sweep.dir={sweep}"])
    run.cli()  # the sweep carries on past its failed jobs and ends normally
    out, err = capsys.readouterr()
    text = out + err
    assert "run failed: exit.patience=0 must be at least 1" in text and "run failed: exit.patience=-1" in text
    assert "Error in call to target" not in text and "Traceback" not in text
    errors = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/error.json"))]
    assert len(errors) == 2
    assert errors[0]["error"].startswith("UserError: exit.patience=0 must be at least 1")
    assert "Traceback" in errors[0]["traceback"]  # the traceback stays in the job's error.json


@pytest.mark.slow
def test_the_command_line_prints_one_line_and_exits_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | {"WANDB_MODE": "disabled",
                                                                             "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "raee.run", *raee_run(tmp_path, "exit=patience", "exit.patience=0")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip() == ("error: exit.patience=0 must be at least 1 (PABEE's t: exit once t+1 consecutive "
                                   "layers agree)")


# ---------------------------------------------------------------------------- exit databases: raee and raee-build-db
@pytest.fixture(scope="module")
def database(tmp_path_factory) -> Path:
    """A tiny exit database (FAISS Flat index), built once; tests damage copies of it."""
    from tests.test_config import compose_cfg

    root = tmp_path_factory.mktemp("db")
    build_db.build(compose_cfg(TINY + [f"db.dir={root / 'db'}", f"paths.cache_dir={root / 'cache'}"]))
    return root / "db"


def damaged(database: Path, tmp_path: Path, how: str) -> Path:
    copy = tmp_path / "db"
    shutil.copytree(database, copy)
    if how == "truncated shard":
        shard = sorted((copy / "shards").rglob("*.npy"))[0]
        shard.write_bytes(shard.read_bytes()[:-8])
    elif how == "corrupt index":
        index = copy / "index" / "index.faiss"
        index.write_bytes(b"not a FAISS index" + index.read_bytes()[64:])
    elif how == "edited meta.json":
        (copy / "meta.json").write_text("{not json")
    return copy


DAMAGE = {"truncated shard": r"has \d+ bytes, meta\.json says \d+ \(truncated or modified\)",
          "corrupt index": r"index file .*index\.faiss is truncated or corrupt .*python -m raee\.build_db",
          "edited meta.json": r"meta\.json is not valid JSON .*rebuild it with `python -m raee\.build_db`"}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_database_is_one_paragraph(how, database, tmp_path, monkeypatch, capsys):
    db = damaged(database, tmp_path, how)
    status, stderr = call(run.cli, raee_run(tmp_path, "exit=raee", f"db.dir={db}"), monkeypatch, capsys)
    assert_user_error(status, stderr, DAMAGE[how])


def test_build_db_append_errors_are_one_paragraph(database, tmp_path, monkeypatch, capsys):
    base = [*TINY, f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    status, stderr = call(build_db.main, [*base, f"db.dir={database}", f"db.append={tmp_path / 'nothing.csv'}"],
                          monkeypatch, capsys)
    assert_user_error(status, stderr, r"db\.append='.*nothing\.csv' is not a file: give a .* file of labelled examples")
    status, stderr = call(build_db.main, [*base, f"db.append={tiny_csv(tmp_path / 'new.csv')}"], monkeypatch, capsys)
    assert_user_error(status, stderr, r"name it with db\.dir=<directory>")
    bad_labels = write(tmp_path / "bad.csv", "text,label\nthe striker scored,football\n")
    status, stderr = call(build_db.main, [*base, f"db.dir={database}", f"db.append={bad_labels}"], monkeypatch, capsys)
    assert_user_error(status, stderr, r"labels \['football'\] that are not among the class names")
    more = write(tmp_path / "more.csv", "text,label\nthe striker scored,sports\nshares rose,business\n")
    db = damaged(database, tmp_path, "truncated shard")
    status, stderr = call(build_db.main, [*base, f"db.dir={db}", f"db.append={more}"], monkeypatch, capsys)
    assert_user_error(status, stderr, r"truncated or modified")


def test_build_db_knob_out_of_range(tmp_path, monkeypatch, capsys):
    status, stderr = call(build_db.main, [*TINY, f"hydra.run.dir={tmp_path / 'run'}", f"db.dir={tmp_path / 'db'}",
                                          f"paths.cache_dir={tmp_path / 'cache'}", "data.test_fraction=0"],
                          monkeypatch, capsys)
    assert_user_error(status, stderr, r"test_fraction=0(\.0)? is outside \(0, 1\)")


# ---------------------------------------------------------------------------- raee-report
def test_report_errors_are_one_paragraph(tmp_path, monkeypatch, capsys):
    def report_status(argv: list[str]) -> tuple[object, str]:
        with pytest.raises(SystemExit) as exit_info:
            report.main(argv)
        return exit_info.value.code, capsys.readouterr().err

    assert_user_error(*report_status([str(tmp_path / "missing")]), r"no such directory: .*missing\. Give the sweep")
    (tmp_path / "file.txt").write_text("x")
    assert_user_error(*report_status([str(tmp_path / "file.txt")]), r"is a file: give the sweep directory")
    assert_user_error(*report_status([str(tmp_path)]), r"no summary\.json below .*python -m raee\.run -m")
    monkeypatch.setattr("raee.report.cli.collect_failed", lambda root: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # a bug: its traceback is Python's
        report.main([str(tmp_path)])


# ---------------------------------------------------------------------------- an experiments/ script
def test_an_experiment_script_prints_a_users_error_as_one_paragraph(tmp_path, monkeypatch, capsys):
    script = ROOT / "experiments" / "benchmark_raee.py"
    monkeypatch.setattr(sys, "argv", [str(script), "backbone=tiny_bert", "data=bbcnews_small", "data.batch_size=0"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert_user_error(exit_info.value.code, capsys.readouterr().err, r"batch_size=0 must be a positive integer")
    monkeypatch.setattr(sys, "argv", [str(script), "no_such_group=x"])  # Hydra's composition error is the user's
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert_user_error(exit_info.value.code, capsys.readouterr().err, r"no_such_group")


# ---------------------------------------------------------------------------- which errors are the user's
def test_what_counts_as_a_users_error():
    err = UserError("exit.k=0 must be at least 1")
    assert user_error(err) is err and user_message(err) == "exit.k=0 must be at least 1"
    try:  # Hydra's instantiate wraps what a constructor raised; its cause is the user's error
        try:
            raise MissingFileError("data file 'x.csv' does not exist:\n  check the path")
        except MissingFileError as cause:
            raise InstantiationException("Error in call to target 'X':\nMissingFileError(...)") from cause
    except InstantiationException as wrapped:
        assert user_message(wrapped) == "data file 'x.csv' does not exist: check the path"  # one line
    try:  # a bug while handling a user's error stays a bug
        try:
            raise UserError("bad knob")
        except UserError:
            {}["missing"]
    except KeyError as bug:
        assert user_error(bug) is None and user_message(bug) is None
    assert user_message(RuntimeError("boom")) is None
    missing = MissingMandatoryValue("Missing mandatory value: data.name")
    missing.full_key = "data.name"
    assert user_message(missing).startswith("data.name has no value")


def test_when_tracebacks_are_shown(monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    assert not show_tracebacks() and not show_tracebacks("WARNING") and not show_tracebacks("LOUD")
    assert show_tracebacks("DEBUG") and show_tracebacks("debug") and show_tracebacks(10)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    assert show_tracebacks() and show_tracebacks("WARNING")
