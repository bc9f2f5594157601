"""Do two runs write the same outputs? Compares two predictions.csv files example by example (by index).

    python experiments/compare_predictions.py RUN_A/predictions.csv RUN_B/predictions.csv [--csv out.csv]

For generation runs the column compared is ``generated`` (the text), for classification ``prediction``.
Prints (and appends to --csv) one row: the examples in both, how many are the same, and the first
indices that differ. Used to check that a lossless method (self_speculative) wrote the full model's text on
every example of a separate full-model run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from raee.atomic import atomic_write_text
from raee.errors import MissingFileError, UserError


def read_predictions(path: Path) -> pd.Series:
    """The outputs of a predictions.csv, indexed by example index."""
    if not path.exists():
        raise MissingFileError(f"{path} does not exist: give a run directory's predictions.csv")
    frame = pd.read_csv(path, keep_default_na=False, dtype={"generated": str})
    column = "generated" if "generated" in frame else "prediction"
    if column not in frame or "index" not in frame:
        raise UserError(f"{path} has no 'index' and 'generated' (or 'prediction') columns: is it a predictions.csv?")
    return frame.set_index("index")[column]


def compare(a: pd.Series, b: pd.Series) -> dict:
    common = a.index.intersection(b.index)
    differ = [int(i) for i in common if a[i] != b[i]]
    return {"examples": len(common), "same": len(common) - len(differ), "only_in_a": len(a.index.difference(b.index)),
            "only_in_b": len(b.index.difference(a.index)), "first_differing": " ".join(map(str, differ[:10]))}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--label", default="",
                        help="the row's name in the CSV's comparison column (e.g. 'self_speculative vs full')")
    parser.add_argument("--csv", type=Path, help="append the row to this CSV (written atomically)")
    args = parser.parse_args(argv)
    row = {"comparison": args.label, **compare(read_predictions(args.a), read_predictions(args.b)),
           "a": str(args.a), "b": str(args.b)}
    print(f"{row['same']} of {row['examples']} examples the same" +
          (f"; first differing: {row['first_differing']}" if row["first_differing"] else ""))
    if args.csv:
        old = pd.read_csv(args.csv, keep_default_na=False) if args.csv.exists() else pd.DataFrame()
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.csv, pd.concat([old, pd.DataFrame([row])], ignore_index=True).to_csv(index=False))
    return 0


if __name__ == "__main__":
    from raee.cli import user_errors

    with user_errors():
        sys.exit(main())
