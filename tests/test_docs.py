"""The published numbers: every table of README.md and docs/ is what its CSV under results/ generates, every
results/ folder carries its provenance, and the MkDocs site builds with --strict."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from raee import provenance
from raee.errors import UserError
from raee.report import docs

ROOT = Path(__file__).resolve().parents[1]

CSV = """method,knobs,dataset,accuracy,mean_layers_computed,wall_speedup,calibrated,knob_threshold
full,,bbcnews,0.9482288828,6.0,1.0,False,
entropy,threshold=0.3,bbcnews,0.9496,2.4316,2.1,False,0.3
entropy,threshold=0.5,bbcnews,0.9469,1.95,2.9,False,0.5
entropy,threshold=0.5,rotten_tomatoes,0.718,2.58,2.2,False,0.5
raee,,bbcnews,0.9482,0.32,14.7,True,
"""

PAGE = """# A page

Some prose.

<!-- table
source: results/x/results.csv
where: "dataset == 'bbcnews'"
rows:
  - label: full model
    where: "method == 'full'"
  - label: "entropy, threshold {knob_threshold}"
    where: "method == 'entropy'"
  - label: RAEE, calibrated
    where: "method == 'raee'"
columns: {label: method, accuracy: accuracy, mean_layers_computed: layers, wall_speedup: wall speed-up}
formats: {accuracy: .4f, wall_speedup: "{:.1f}x"}
bold: calibrated == True
-->
stale
<!-- end table -->

More prose.
"""

EXPECTED = """| method | accuracy | layers | wall speed-up |
| --- | --- | --- | --- |
| full model | 0.9482 | 6.0 | 1.0x |
| entropy, threshold 0.3 | 0.9496 | 2.4316 | 2.1x |
| entropy, threshold 0.5 | 0.9469 | 1.95 | 2.9x |
| **RAEE, calibrated** | **0.9482** | **0.32** | **14.7x** |
"""


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    (tmp_path / "results" / "x").mkdir(parents=True)
    (tmp_path / "results" / "x" / "results.csv").write_text(CSV)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text(PAGE)
    return tmp_path


def test_a_table_is_generated_from_its_csv(repo):
    new = docs.generate_page(PAGE, repo, "page.md")
    assert EXPECTED in new
    assert new.startswith("# A page\n\nSome prose.\n\n<!-- table\n") and new.endswith("<!-- end table -->\n\nMore prose.\n")
    assert docs.generate_page(new, repo) == new  # idempotent
    # cells keep the CSV's text unless a format is named (a transcribed table keeps its digits)
    assert "| 2.4316 |" in new and "| 6.0 |" in new


def test_a_block_inside_fenced_code_is_an_example_not_a_table(repo):
    example = "Write this:\n\n````markdown\n" + PAGE.split("\n\n")[2] + "\n````\n"
    page = example + "\n" + PAGE
    new = docs.generate_page(page, repo)
    assert new.startswith(example) and new.count(EXPECTED) == 1


def test_check_reports_a_stale_page_and_docs_rewrites_it(repo, capsys):
    assert docs.main_docs(repo, check=True) == 1
    out = capsys.readouterr().out
    assert "docs/page.md" in out and "-stale" in out and "+| full model | 0.9482 |" in out
    assert "stale" in (repo / "docs" / "page.md").read_text()  # --check changes nothing
    assert docs.main_docs(repo) == 0
    assert EXPECTED in (repo / "docs" / "page.md").read_text()
    assert docs.main_docs(repo, check=True) == 0
    # a changed number in the CSV makes the page stale again
    csv = repo / "results" / "x" / "results.csv"
    csv.write_text(csv.read_text().replace("0.9496", "0.9510"))
    assert [c.path.name for c in docs.changes(repo)] == ["page.md"]


def test_a_broken_page_is_named_and_the_others_still_regenerate(repo, capsys):
    (repo / "docs" / "broken.md").write_text(PAGE.replace("results/x/results.csv", "results/gone/results.csv"))
    assert docs.main_docs(repo) == 2
    assert "results/gone/results.csv" in capsys.readouterr().err
    assert EXPECTED in (repo / "docs" / "page.md").read_text()


def test_across_puts_one_column_group_per_dataset(repo):
    spec = {"source": "results/x/results.csv", "where": "method == 'entropy'",
            "rows": [{"label": "entropy, threshold {knob_threshold}", "where": "method == 'entropy'"}],
            "across": {"column": "dataset", "values": {"bbcnews": "BBC News", "rotten_tomatoes": "RT"}},
            "columns": {"label": "method", "accuracy": "acc"}}
    table = docs.render(spec, repo)
    assert table.splitlines() == ["| method | BBC News acc | RT acc |", "| --- | --- | --- |",
                                  "| entropy, threshold 0.3 | 0.9496 |  |", "| entropy, threshold 0.5 | 0.9469 | 0.718 |"]


def test_bad_specs_are_named(repo):
    base = {"source": "results/x/results.csv", "columns": {"accuracy": "accuracy"}}
    with pytest.raises(UserError, match="matches no run"):
        docs.render({**base, "rows": [{"where": "method == 'patience'"}]}, repo, "p.md:3")
    with pytest.raises(UserError, match="no column"):
        docs.render({**base, "columns": {"flops": "FLOPs"}}, repo)
    with pytest.raises(UserError, match="no .*missing.csv"):
        docs.render({**base, "source": "results/missing.csv"}, repo)
    with pytest.raises(UserError, match="unknown table spec key"):
        docs.parse_spec("source: a.csv\ncolumns: {a: a}\ncolums: {}\n")
    with pytest.raises(UserError, match="cannot apply"):
        docs.render({**base, "where": "nonsense ==="}, repo)


def test_cli_docs_check_on_a_stale_page(repo, monkeypatch, capsys):
    from raee.report import main

    monkeypatch.chdir(repo / "docs")  # the repository root is found above the working directory
    assert main(["--docs", "--check"]) == 1
    assert main(["--docs"]) == 0
    assert main(["--docs", "--check"]) == 0
    assert "0 page(s)" in capsys.readouterr().out


def test_the_config_reference_names_every_config_file():
    text = docs.config_reference(ROOT)
    for path in (ROOT / "conf").glob("*/*.yaml"):
        assert f"### {path.parent.name}" in text and f"| `{path.stem}` |" in text, path
    assert "`raee.exits.EntropyExit`" in text and "`threshold`, `min_layer`" in text


# ------------------------------------------------------------------ provenance


def test_provenance_records_each_step(tmp_path):
    folder = tmp_path / "results" / "demo"
    assert provenance.main([str(folder), "--raw-outputs", "not kept", "--", sys.executable, "-c", "pass"]) == 0
    assert provenance.main([str(folder), "--", sys.executable, "-c", "raise SystemExit(3)"]) == 3
    record = provenance.read_provenance(folder)
    assert record["experiment"] == "demo" and record["status"] == "measured" and record["raw_outputs"] == "not kept"
    first, second = record["steps"]
    assert first["command"].endswith("-c pass") and first["returncode"] == 0 and second["returncode"] == 3
    for key in ("cpu_model", "cores", "platform", "python"):
        assert first["machine"][key]
    assert len(first["load_average"]["start"]) == 3 and len(first["load_average"]["end"]) == 3
    assert set(first["versions"]) >= {"torch", "transformers", "faiss", "raee"} and first["versions"]["torch"]
    assert first["started"].endswith("Z") and first["seconds"] >= 0


def test_provenance_problems_are_named(tmp_path, capsys):
    assert "a transcribed result names its 'source'" in " ".join(provenance.check_provenance(
        {"format": 1, "experiment": "x", "status": "transcribed", "steps": [{"command": "c", "commit": None,
                                                                              "started": "s"}]}))
    assert provenance.check_provenance({"status": "guessed"})[:1] == ["missing 'format'"]
    (tmp_path / "provenance.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        provenance.read_provenance(tmp_path)
    assert provenance.main([str(tmp_path)]) == 2
    assert "give the command after --" in capsys.readouterr().err


# ------------------------------------------------------------------ this repository


def test_every_page_of_the_repository_is_generated_from_results():
    stale = docs.changes(ROOT)
    assert not stale, "\n".join(c.diff() for c in stale) + "\nrun `python -m raee.report --docs`"


def test_every_result_has_its_provenance():
    folders = sorted(p for p in (ROOT / "results").iterdir() if p.is_dir())
    assert folders, "results/ holds the published results"
    for folder in folders:
        assert list(folder.glob("*.csv")), f"{folder} holds no CSV"
        record = provenance.read_provenance(folder)  # raises with what is missing
        assert record["experiment"], folder
    for source in docs.table_sources(ROOT):
        assert (source.parent / provenance.FILE).exists() or (source.parents[1] / provenance.FILE).exists(), source


def test_readme_is_the_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move detail into docs/"


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[docs]')")
    pytest.importorskip("material", reason="mkdocs-material is not installed (pip install -e '.[docs]')")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_extending_guides_exit_strategy_runs(tiny_bert):
    """The MarginExit of docs/guides/extending.md, as printed there, exits where its rule says."""
    import re

    import torch

    from raee.exit_loop import run_early_exit
    from tests.test_exit_loop import ctx_for, scripted

    text = (ROOT / "docs" / "guides" / "extending.md").read_text()
    code = re.search(r"```python\n(# raee/exits/margin.py\n.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "extending.md", "exec"), namespace)  # noqa: S102 - our own documentation
    margin_exit = namespace["MarginExit"](margin=0.5, min_layer=1)
    # example 0: confident from layer 0 on (min_layer keeps it to layer 1); example 1: never confident
    head, enc = scripted(tiny_bert, [[0] * (tiny_bert.num_layers + 1), [1] * (tiny_bert.num_layers + 1)])
    head.table[int(enc["input_ids"][1, 1])] = torch.zeros(tiny_bert.num_layers + 1, 3)
    result = run_early_exit(tiny_bert, head, margin_exit, enc, ctx_for(tiny_bert, 2))
    assert result.exit_layers.tolist() == [1, tiny_bert.num_layers]
    assert margin_exit.knobs() == {"margin": 0.5, "min_layer": 1}
