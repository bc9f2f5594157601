"""The Pareto set of an Optuna search (``hydra/sweeper=optuna``, ``+hparams_search=...``).

Hydra's Optuna sweeper writes ``optimization_results.yaml`` into the sweep directory: for a
multi-objective study the Pareto-optimal trials (``solutions``: params and values), for one objective
the best params and value. :func:`pareto_table` reads it, names the values after the sweep's
``objectives`` and directions (from a trial's saved config) and finds each trial's job directory
by its overrides, so the report can show which runs the search kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

RESULTS_FILE = "optimization_results.yaml"


def _yaml(path: Path) -> Any:
    import yaml  # PyYAML comes with Hydra

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def find_searches(root: str | Path) -> list[Path]:
    """Sweep directories below ``root`` (or ``root`` itself) that hold an Optuna result."""
    root = Path(root)
    return sorted({p.parent for p in [root / RESULTS_FILE, *root.rglob(RESULTS_FILE)] if p.is_file()})


def _objectives(sweep: Path, count: int) -> list[str]:
    """'accuracy (maximize)', ... from a trial's saved config; 'objective 0', ... when it is unknown."""
    job = next(iter(sorted(sweep.glob("*/.hydra"))), None)
    config = (_yaml(job / "config.yaml") if job else None) or {}
    hydra = ((_yaml(job / "hydra.yaml") if job else None) or {}).get("hydra") or {}
    names = list(config.get("objectives") or [])
    directions = (hydra.get("sweeper") or {}).get("direction")
    directions = directions if isinstance(directions, list) else [directions] * count
    if len(names) != count:
        names = [f"objective {i}" for i in range(count)]
    return [f"{n} ({d})" if d else n for n, d in zip(names, directions)]


def _job_of(sweep: Path, params: dict[str, Any]) -> str:
    """The job directory (relative to the sweep) whose overrides hold every ``key=value`` of ``params``."""
    wanted = {f"{k}={v}" for k, v in params.items()}
    for overrides in sorted(sweep.glob("*/.hydra/overrides.yaml")):
        if wanted <= {str(o) for o in _yaml(overrides) or []}:
            return overrides.parent.parent.name
    return ""


def pareto_table(sweep: str | Path) -> pd.DataFrame:
    """One row per Pareto-optimal trial (the best trial for one objective): objectives, params, job."""
    sweep = Path(sweep)
    result = _yaml(sweep / RESULTS_FILE) or {}
    if "solutions" in result:
        solutions = [(s.get("params") or {}, list(s.get("values") or [])) for s in result["solutions"]]
    elif "best_params" in result:
        solutions = [(result["best_params"] or {}, [result.get("best_value")])]
    else:
        return pd.DataFrame()
    count = max((len(values) for _, values in solutions), default=0)
    names = _objectives(sweep, count)
    rows = [{**dict(zip(names, values)), **params, "run": _job_of(sweep, params)} for params, values in solutions]
    return pd.DataFrame(rows)


def pareto_markdown(root: str | Path) -> str:
    """A '## Optuna Pareto set' section per search below ``root`` ('' when there is none)."""
    from raee.report import markdown_table

    parts = []
    for sweep in find_searches(root):
        table = pareto_table(sweep)
        if len(table):
            parts += [f"## Optuna Pareto set: {sweep} ({len(table)} trial(s))", "",
                      "Trials no other trial beats on every objective (as the sweeper judged them).", "",
                      markdown_table(table, default_fmt=".4g"), ""]
    return "\n".join(parts)
