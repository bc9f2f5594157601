"""The notebooks run top to bottom on the offline default (executed with nbclient)."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

pytestmark = [pytest.mark.slow, pytest.mark.real_model]


def execute(name: str, tmp_path: Path, env: dict[str, str]) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits the environment
    try:
        NotebookClient(nb, timeout=900, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOKS.parent)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def stream_text(nb: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if o.get("output_type") == "stream")


def test_raee_walkthrough_runs(tmp_path):
    nb = execute("raee_walkthrough.ipynb", tmp_path, {"RAEE_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "disabled"})
    text = stream_text(nb)
    assert "300 training examples" in text
    assert "examples per layer 1..L" in text
    assert any(o.get("output_type") == "display_data" for c in nb.cells for o in c.get("outputs", [])), \
        "the layer-distribution chart must be drawn"


def test_sweep_report_notebook_on_a_tiny_sweep(tmp_path):
    import subprocess
    import sys

    sweep = tmp_path / "sweep"
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "raee.run", "-m", "exit=full,fixed", "backbone=tiny_bert",
                           "data=bbcnews_small", "data.max_train_examples=40", "data.max_eval_examples=20",
                           "logger=none", "compare_oracle=false", "trainer.enable_progress_bar=false",
                           f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    nb = execute("sweep_report.ipynb", tmp_path, {"RAEE_SWEEP_DIR": str(sweep), "WANDB_MODE": "disabled"})
    assert "most accurate exit method" in stream_text(nb)
    assert (sweep / "notebook_charts" / "speed_vs_accuracy.png").exists()
    assert (sweep / "notebook_charts" / "exit_layers.png").exists()
