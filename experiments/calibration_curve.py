"""A calibration's validation curve as a CSV: every grid value's validation score, mean exit layer and FLOPs
speed-up, the full model's point, and which one the calibration chose.

    python experiments/calibration_curve.py <cache_dir>/calibration/<key>.json --csv results/<experiment>/curve.csv

Reads a calibration record as the generation strategies cache it (``{"description": ..., "result": ...}``:
raee.generation.confidence) or a run's summary.json (its "calibration" field). The record is data: JSON only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from raee.atomic import atomic_write_text
from raee.errors import UserError
from raee.generation.confidence import ConfidenceGeneration, stored_full_point


def curve_rows(record: dict) -> list[dict]:
    """One row per grid value, then the full model's point; ``chosen`` marks the calibration's choice."""
    result = record.get("result") or record.get("calibration")
    if not isinstance(result, dict) or "curve" not in result:
        raise UserError("no calibration curve in this file: give a <cache_dir>/calibration/<key>.json record or the "
                        "summary.json of a calibrated run")
    description = record.get("description") or {}
    full = stored_full_point(result, (description.get("backbone") or {}).get("num_layers"))
    if description.get("target"):  # the choice made again by today's rule, as the strategy does on loading its cache
        chosen = ConfidenceGeneration(**description["target"]).choose(result["curve"], full)["value"]
    else:
        chosen = result.get("value")
    rows = [{"setting": f"{result.get('knob', 'value')} {p['value']:g}", "value": p["value"],
             "validation_metric": p["accuracy"], "mean_exit_layer": p.get("mean_exit_layer"),
             "flops_speedup": p.get("flops_speedup"), "num_examples": p.get("num_examples")}
            for p in result["curve"]]
    rows.append({"setting": "no exit (the full model)", "value": None, "validation_metric": full["accuracy"],
                 "mean_exit_layer": full.get("mean_exit_layer"), "flops_speedup": full.get("flops_speedup", 1.0),
                 "num_examples": full.get("num_examples", result.get("num_examples"))})
    for row in rows:
        row.update(metric=result.get("metric", "accuracy"), split=result.get("split", "validation"),
                   chosen="yes" if row["value"] == chosen else "")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("record", type=Path, help="a calibration cache record (JSON) or a run's summary.json")
    parser.add_argument("--csv", type=Path, help="write the rows here (atomically)")
    args = parser.parse_args(argv)
    try:
        record = json.loads(args.record.read_text())
    except FileNotFoundError:
        raise UserError(f"{args.record} does not exist: give a file under <cache_dir>/calibration/") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{args.record} is not JSON ({err})") from None
    frame = pd.DataFrame(curve_rows(record))
    print(frame.to_string(index=False))
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.csv, frame.to_csv(index=False))
        print(f"wrote {args.csv}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from raee.cli import user_errors

    with user_errors():
        sys.exit(main())
