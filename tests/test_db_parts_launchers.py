"""A build in parts through real Hydra launchers, in real processes: ``python -m raee.build_db -m
db.part=... db.parts=...`` with joblib, submitit's local executor and a local Ray instance, then the merge
(``db.merge=true``); each merged database equals a one-process build file for file. Skipped where the
plugin is not installed (pip install -e '.[launchers]' / '.[ray]')."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_config import TINY

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DB = ["db.shard_rows=8"]  # 60 training examples: 8 shards


def run_build_db(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """``python -m raee.build_db`` in its own process, importing this checkout's raee."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", PYTHONPATH=path, RAY_USAGE_STATS_ENABLED="0")
    return subprocess.run([sys.executable, "-m", "raee.build_db", *args, *TINY, *DB,
                           f"paths.cache_dir={tmp_path / 'cache'}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)


def content_hash(directory: Path) -> str:
    return json.loads((directory / "meta.json").read_text())["content_hash"]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> str:
    """The content hash of a one-process build (``python -m raee.build_db``) of the same database."""
    tmp_path = tmp_path_factory.mktemp("single")
    proc = run_build_db([f"db.dir={tmp_path / 'db'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return content_hash(tmp_path / "db")


def build_in_parts_and_merge(tmp_path: Path, launcher: list[str], parts: int, single: str) -> Path:
    """The parts through ``launcher``, the merge as its own command; equal to the one-process build."""
    target = tmp_path / "db"
    sweep = tmp_path / "sweep"
    proc = run_build_db(["-m", *launcher, f"db.part={','.join(map(str, range(parts)))}", f"db.parts={parts}",
                         f"db.dir={target}", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    staging = tmp_path / "db.parts"
    assert sorted(p.name for p in staging.glob("part-*")) == [f"part-{p}-of-{parts}" for p in range(parts)]
    assert all((staging / f"part-{p}-of-{parts}" / "part.json").is_file() for p in range(parts))
    merged = run_build_db([f"db.dir={target}", "db.merge=true"], tmp_path)
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert "exit database: 60 examples in 8 shard(s)" in merged.stdout and not staging.exists()
    assert content_hash(target) == single  # every shard file the same
    assert json.loads((target / "meta.json").read_text())["build"]["parts"] == parts
    return sweep


def test_joblib_builds_four_parts_in_parallel_processes(tmp_path, single):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="pip install -e '.[launchers]'")
    sweep = build_in_parts_and_merge(tmp_path, ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], parts=4,
                                     single=single)
    assert len([p for p in sweep.iterdir() if p.is_dir() and "db.part=" in p.name]) == 4


def test_submitit_local_builds_two_parts(tmp_path, single):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[launchers]'")
    sweep = build_in_parts_and_merge(tmp_path, ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"],
                                     parts=2, single=single)
    logs = list((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2, "submitit ran each part as its own process"


def test_ray_builds_two_parts_on_a_local_ray_instance(tmp_path, single):
    pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="Ray is not installed: pip install -e '.[ray]'")
    build_in_parts_and_merge(tmp_path, ["hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2"], parts=2,
                             single=single)
