#!/usr/bin/env python
"""Pair two quality results by case: ``other − reference`` Dice per test case, from the ``dice_per_case`` that
``quality.py`` keeps in each model's entry of its result file.

Runs of different GPU sessions (one model per session at a 10-minute budget) leave their per-case tables on the
device machine; their result files still pair by case, which separates a change from the case-to-case spread that
a difference of means carries. Example, the next augmentation run against the fourth H100 session's::

    python benchmarks/pair_results.py benchmarks/results/quality_nvidia-h100-80gb-hbm3_2026-11-27.json \\
        /work/.device/2/quality.json                            # MedSegDiff-V2 of both files (the default)
    python benchmarks/pair_results.py a.json b.json --models baseline medsegdiff --out pair.json

Prints (and with ``--out`` writes as JSON) the mean difference, its standard error, the median and how many cases
each side wins (``quality.paired_stats``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cpu_result import write_result  # also puts the repository root on sys.path
from quality import paired_stats

MODELS = ("medsegdiff", "baseline")


def per_case(path: Path, model: str):
    """The ``dice_per_case`` of ``model``'s entry in the result file ``path`` as a ``pandas.Series`` (case -> Dice).

    Raises:
        SystemExit: the file is missing or not JSON, or has no per-case Dice for ``model`` (the message names the file
            and the key).
    """
    import pandas as pd

    from medsegdiff_bundle.utils import read_json_object

    try:
        result = read_json_object(path, "result file")
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    cases = (result.get(model) or {}).get("dice_per_case")
    if not isinstance(cases, dict) or not cases:
        raise SystemExit(f"error: {path} has no {model}.dice_per_case (results written before quality.py kept "
                         "each case's Dice hold means only and cannot be paired by case).")
    return pd.Series(cases, dtype=float)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reference", type=Path, help="result file of the reference run")
    p.add_argument("other", type=Path, help="result file of the run compared with it")
    p.add_argument("--models", nargs=2, choices=MODELS, default=["medsegdiff", "medsegdiff"],
                   metavar=("REFERENCE_MODEL", "OTHER_MODEL"),
                   help=f"the entry of each file to pair, one of {MODELS} (default: medsegdiff in both)")
    p.add_argument("--out", type=Path, default=None, help="also write the pairing as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    ref_model, other_model = args.models
    reference, other = per_case(args.reference, ref_model), per_case(args.other, other_model)
    names = (f"{args.reference} ({ref_model})", f"{args.other} ({other_model})")
    stats = paired_stats(reference, other, "dice", names)
    result = {"reference": names[0], "other": names[1], "reference_dice": float(reference.mean()),
              "other_dice": float(other.mean()), "other_minus_reference": stats}
    print(f"{names[1]} minus {names[0]}, {stats['cases']} cases: Dice {stats['mean']:+.4f} ± "
          f"{stats['standard_error']:.4f} (standard error), median {stats['median']:+.4f}, higher on "
          f"{stats['cases_higher']} cases, lower on {stats['cases_lower']}")
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
