"""The docs' result tables, generated from the CSVs under ``results/``: ``python -m raee.report --docs``.

A Markdown page (README.md, experiments/README.md, docs/**/*.md) asks for a table with a block whose
opening HTML comment holds the table's spec in YAML; everything up to the closing comment is generated::

    <!-- table
    source: results/default/results.csv     # relative to the repository root
    where: "dataset == 'bbcnews'"            # optional: a pandas query on the CSV
    rows:                                    # optional: pick and label runs, in this order
      - label: full model
        where: "method == 'full'"
      - label: "entropy, threshold {knob_threshold}"   # str.format over the run's columns
        where: "method == 'entropy'"                   # every match is a row (in CSV order)
    across:                                  # optional: one column group per value of a column
      column: dataset
      values: {bbcnews: BBC News, rotten_tomatoes: Rotten Tomatoes}
    columns: {label: method, accuracy: accuracy, mean_layers_computed: layers}   # column -> header, in order
    formats: {accuracy: .4f, mean_layers_computed: .2f, wall_speedup: "{:.2f}x"}
    bold: "calibrated == True"               # optional: rows to set in bold
    sort: [dataset, accuracy]                # optional
    -->
    | method | accuracy | layers |
    | --- | --- | --- |
    ...
    <!-- end table -->

Cells are the CSV's text as written unless ``formats`` names the column (a format spec such as ``.4f``,
``.1%``, or a ``{:...}`` template), so a transcribed table keeps its digits and a report's CSV is rounded
where the page says. A ``rows`` entry that matches nothing is an error: a page cannot silently lose a row
when its CSV changes. ``--docs --check`` (and tests/test_docs.py) fail when a page differs from what its
CSVs generate; no number in these tables is typed by hand.
"""

from __future__ import annotations

import difflib
import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from raee.atomic import atomic_write_text
from raee.errors import UserError

#: the opening comment (its body is the YAML spec) and the closing comment of a generated table
BLOCK = re.compile(r"(?P<open><!-- table\n(?P<spec>.*?)-->\n)(?P<body>.*?)(?P<close><!-- end table -->)", re.S)
#: pages scanned for tables, relative to the repository root
PAGES = ("README.md", "experiments/README.md", "docs/**/*.md")
SPEC_KEYS = {"source", "where", "rows", "across", "columns", "formats", "bold", "sort"}
#: a section generated from the repository itself (not from results/): <!-- generated: NAME --> ... <!-- end generated -->
GENERATED = re.compile(r"(?P<open><!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(?P<close><!-- end generated -->)", re.S)


@dataclass(frozen=True)
class Change:
    """A page whose generated tables differ from what is written in it."""

    path: Path
    old: str
    new: str

    def diff(self) -> str:
        return "".join(difflib.unified_diff(self.old.splitlines(True), self.new.splitlines(True),
                                            fromfile=f"{self.path} (written)", tofile=f"{self.path} (generated)"))


def repo_root(start: str | Path = ".") -> Path:
    """The nearest directory at or above ``start`` that holds results/ or pyproject.toml."""
    start = Path(start).resolve()
    for d in [start, *start.parents]:
        if (d / "results").is_dir() or (d / "pyproject.toml").exists():
            return d
    raise UserError(f"no repository root (a folder with results/ or pyproject.toml) at or above {start}")


def parse_spec(text: str, where: str = "") -> dict[str, Any]:
    import yaml  # PyYAML comes with Hydra

    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"{where}: the table spec is not valid YAML: {err}") from err
    if not isinstance(spec, dict) or "source" not in spec or "columns" not in spec:
        raise UserError(f"{where}: a table spec needs at least 'source' (a CSV under results/) and 'columns'")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise UserError(f"{where}: unknown table spec key(s) {sorted(unknown)}; known: {sorted(SPEC_KEYS)}")
    if not isinstance(spec["columns"], dict) or not spec["columns"]:
        raise UserError(f"{where}: 'columns' maps CSV column -> header, e.g. {{accuracy: accuracy}}")
    return spec


def read_source(path: Path, where: str = "") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(typed frame for queries, sorting and formats; the CSV's text as written, same index)."""
    if not path.exists():
        raise UserError(f"{where}: no {path}: a table's source is a CSV under results/ (see docs/guides/publishing-results.md)")
    typed = pd.read_csv(path)
    text = pd.read_csv(path, dtype=str, keep_default_na=False)
    return typed, text


def format_cell(value: Any, text: str, fmt: str | None) -> str:
    if fmt is None or text == "":
        return text
    try:
        number = float(value)
    except (TypeError, ValueError):
        return text
    if not math.isfinite(number):
        return ""
    return fmt.format(number) if "{" in fmt else format(number, fmt)


def _query(df: pd.DataFrame, expr: str | None, where: str) -> pd.DataFrame:
    if not expr:
        return df
    try:
        return df.query(expr, engine="python")
    except Exception as err:  # noqa: BLE001 - pandas raises many kinds; all mean a bad spec
        raise UserError(f"{where}: cannot apply {expr!r} to the CSV ({type(err).__name__}: {err})") from err


def _plain(value: Any) -> Any:
    """A label's value as a reader writes it: 3.0 -> 3 (a knob column with gaps is read as floats)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _label(template: str, row: pd.Series, where: str) -> str:
    try:
        return str(template).format(**{str(k): _plain(v) for k, v in row.items()})
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(f"{where}: label {template!r} names a column the CSV lacks ({err})") from err


def _selected(typed: pd.DataFrame, spec: dict[str, Any], where: str) -> pd.DataFrame:
    """The rows of the table, in order, with a 'label' column (a row's ``rows`` label, else its method)."""
    df = _query(typed, spec.get("where"), where)
    if spec.get("sort"):
        df = df.sort_values(list(spec["sort"]), kind="stable")
    if not spec.get("rows"):
        return df.assign(label=df["method"] if "method" in df.columns else "")
    parts = []
    for i, selector in enumerate(spec["rows"]):
        if not isinstance(selector, dict) or "where" not in selector:
            raise UserError(f"{where}: rows[{i}] needs 'where' (a query) and may have 'label'")
        match = _query(df, selector["where"], where)
        if match.empty:
            raise UserError(f"{where}: rows[{i}] ({selector['where']!r}) matches no run of the CSV")
        labels = [_label(selector.get("label", "{method}"), r, where) for _, r in match.iterrows()]
        parts.append(match.assign(label=labels))
    return pd.concat(parts)


def render(spec: dict[str, Any], root: Path, where: str = "") -> str:
    """The Markdown table a spec asks for (see the module docstring)."""
    typed, text = read_source(root / spec["source"], where)
    formats: dict[str, str] = {str(k): str(v) for k, v in (spec.get("formats") or {}).items()}
    columns: dict[str, str] = {str(k): str(v) for k, v in spec["columns"].items()}
    missing = [c for c in columns if c != "label" and c not in typed.columns]
    if missing:
        raise UserError(f"{where}: {spec['source']} has no column(s) {missing}")
    rows = _selected(typed, spec, where)
    bold = set(_query(typed, spec.get("bold"), where).index) if spec.get("bold") else set()

    def cell(index: Any, column: str, label: str) -> str:
        if column == "label":
            return label
        return format_cell(typed.at[index, column], text.at[index, column], formats.get(column))

    across = spec.get("across")
    if across:
        col, values = across["column"], dict(across["values"])
        headers = [columns.get("label", "")] if "label" in columns else []
        headers += [f"{name} {h}" for name in values.values() for c, h in columns.items() if c != "label"]
        body = []
        for label, group in rows.groupby("label", sort=False):
            cells = [str(label)] if "label" in columns else []
            for value in values:
                hit = group[group[col].astype(str) == str(value)]
                cells += ["" if hit.empty else cell(hit.index[0], c, str(label)) for c in columns if c != "label"]
            body.append((cells, any(i in bold for i in group.index)))
    else:
        headers = list(columns.values())
        body = [([cell(i, c, str(r["label"])) for c in columns], i in bold) for i, r in rows.iterrows()]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for cells, strong in body:
        cells = [c.replace("|", "\\|") for c in cells]
        if strong:
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def fenced_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of fenced code blocks (``` or ~~~, any length): a table block shown as an
    example inside one is left alone."""
    spans, start, fence = [], 0, ""
    pos = 0
    for line in text.splitlines(keepends=True):
        stripped = line.lstrip()
        marker = re.match(r"(`{3,}|~{3,})", stripped)
        if marker and not fence:
            fence, start = marker.group(1), pos
        elif marker and fence and marker.group(1).startswith(fence) and not stripped[len(marker.group(1)):].strip():
            spans.append((start, pos + len(line)))
            fence = ""
        pos += len(line)
    if fence:
        spans.append((start, len(text)))
    return spans


def blocks(text: str) -> list[re.Match[str]]:
    """The table blocks of a page, outside fenced code."""
    spans = fenced_spans(text)
    return [m for m in BLOCK.finditer(text) if not any(a <= m.start() < b for a, b in spans)]


def _yaml_comment(path: Path) -> str:
    """The leading comment of a config file as one line, up to its first sentence that ends within 300 chars."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        body = line[1:].strip()
        if body.startswith("@package") or line.startswith("#  "):  # a package line, an indented example
            if lines:
                break
            continue
        lines.append(body)
    text = " ".join(lines).strip().replace("<", "&lt;").replace(">", "&gt;")  # prose, not HTML tags
    cut = [i + 1 for i, ch in enumerate(text) if ch == "." and (i + 1 == len(text) or text[i + 1] == " ") and i < 300]
    return text[:cut[-1]] if len(text) > 300 and cut else text


def _yaml_fields(path: Path) -> str:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return ""
    if not isinstance(data, dict):
        return ""
    keys = [str(k) for k in data if k not in ("_target_", "defaults")]
    return ", ".join(f"`{k}`" for k in keys)


def config_reference(root: Path) -> str:
    """One table per config group of conf/: option, what its file's comment says, its fields and `_target_`."""
    conf = root / "conf"
    parts = []
    for group in sorted(d for d in conf.iterdir() if d.is_dir() and not d.name.startswith("_")):
        files = sorted(group.glob("*.yaml"))
        if not files:
            continue
        rows = ["| option | what | fields | `_target_` |", "| --- | --- | --- | --- |"]
        import yaml

        for f in files:
            try:
                target = (yaml.safe_load(f.read_text()) or {}).get("_target_", "")
            except (yaml.YAMLError, AttributeError):
                target = ""
            cells = [f"`{f.stem}`", _yaml_comment(f), _yaml_fields(f), f"`{target}`" if target else ""]
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        parts.append(f"### {group.name}\n\n`{group.name}=<option>`: `conf/{group.name}/<option>.yaml`\n\n"
                     + "\n".join(rows) + "\n")
    return "\n".join(parts)


#: the generated sections a page may hold (<!-- generated: NAME -->)
SECTIONS = {"config-reference": config_reference}


def generate_page(text: str, root: Path, where: str = "") -> str:
    """The page with every table block and generated section regenerated."""
    out, last = [], 0
    for match in blocks(text):
        line = text.count("\n", 0, match.start()) + 1
        spec = parse_spec(match["spec"], f"{where}:{line}")
        out += [text[last:match.start()], match["open"], render(spec, root, f"{where}:{line}"), match["close"]]
        last = match.end()
    text = "".join(out) + text[last:]

    def section(match: re.Match[str]) -> str:
        if match["name"] not in SECTIONS:
            raise UserError(f"{where}: unknown generated section {match['name']!r}; known: {sorted(SECTIONS)}")
        return match["open"] + SECTIONS[match["name"]](root) + match["close"]

    return GENERATED.sub(section, text)


def pages(root: Path, patterns: Sequence[str] = PAGES) -> list[Path]:
    found: set[Path] = set()
    for pattern in patterns:
        found.update(p for p in root.glob(pattern) if p.is_file())
    return sorted(found)


def changes(root: str | Path | None = None, files: Iterable[Path] | None = None,
            errors: list[str] | None = None) -> list[Change]:
    """Every page (README.md, experiments/README.md, docs/**/*.md) whose tables differ from their CSVs.
    With ``errors`` (a list), a page whose tables cannot be generated is named there and skipped instead of
    raising, so that the other pages are still regenerated."""
    root = repo_root() if root is None else Path(root)
    out = []
    for path in pages(root) if files is None else files:
        old = path.read_text()
        if "<!-- table" not in old and "<!-- generated:" not in old:
            continue
        try:
            new = generate_page(old, root, str(path.relative_to(root) if path.is_relative_to(root) else path))
        except UserError as err:
            if errors is None:
                raise
            errors.append(str(err))
            continue
        if new != old:
            out.append(Change(path, old, new))
    return out


def table_sources(root: Path) -> set[Path]:
    """Every CSV a page's table reads (to check that each results/ folder has its provenance)."""
    sources = set()
    for path in pages(root):
        for match in blocks(path.read_text()):
            sources.add(root / parse_spec(match["spec"], str(path))["source"])
    return sources


def main_docs(root: str | Path | None = None, check: bool = False) -> int:
    """``python -m raee.report --docs [--check]``: rewrite (or only compare) the pages' generated tables."""
    root = repo_root() if root is None else Path(root)
    errors: list[str] = []
    found = changes(root, errors=errors)
    for change in found:
        if check:
            print(change.diff())
        else:
            atomic_write_text(change.path, change.new)
    verb = "differ from their CSVs" if check else "regenerated"
    names = ", ".join(str(c.path.relative_to(root)) for c in found)
    print(f"{len(found)} page(s) {verb}" + (f": {names}" if names else "") +
          (" (run `python -m raee.report --docs` to regenerate)" if check and found else ""))
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return 2 if errors else (1 if check and found else 0)
