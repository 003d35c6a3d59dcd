#!/usr/bin/env python
"""What an epoch's end costs the bundle's training loop: iterations per minute with one-pass epochs against
fixed-length ones (``iterations_per_epoch``), same data, same model, same time budget.

Every epoch end restarts the loader's workers and writes a checkpoint (and checks the time budget). On a small
dataset a pass is only a few batches, so these costs take a large share of the time; nnU-Net fixes its epochs at 250
batches for this reason. Each arm runs ``train.json`` in a fresh bundle root on synthetic 2D cases for ``--minutes``
(the time budget stops it at the first epoch end past the budget) and reads the iteration count back from the last
checkpoint.

Example::

    python benchmarks/epoch_overhead.py --out benchmarks/results/epoch_overhead_cpu-2c_2026-11-26.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from cpu_result import cpu_result, write_result  # also puts the repository root on sys.path


def run_arm(root: Path, iterations_per_epoch: int | None, args: argparse.Namespace) -> dict:
    """Train for ``args.minutes`` in ``root``; return the iterations done, the epoch length and the wall time."""
    from medsegdiff_bundle.data import write_synthetic_dataset
    from medsegdiff_bundle.engine import latest_checkpoint, load_checkpoint, run_bundle

    write_synthetic_dataset(root / "data", args.cases, (args.size, args.size), seed=args.seed)
    start = time.monotonic()
    run_bundle("train", "train", root, channels=args.channels, patch_size=[args.size, args.size],
               batch_size=args.batch_size, num_workers=args.num_workers, amp=False, max_epochs=1_000_000,
               time_budget_minutes=args.minutes, val_interval=1_000_000, iterations_per_epoch=iterations_per_epoch,
               seed=args.seed)
    wall = time.monotonic() - start
    trainer = load_checkpoint(latest_checkpoint(root / "models"))["trainer"]
    return {"iterations_per_epoch": iterations_per_epoch, "epoch_length": int(trainer["epoch_length"]),
            "iterations": int(trainer["iteration"]), "wall_s": wall,
            "iterations_per_minute": 60.0 * int(trainer["iteration"]) / wall}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="result JSON (default: print only)")
    p.add_argument("--minutes", type=float, default=1.0, help="training budget per arm")
    p.add_argument("--iterations-per-epoch", type=int, default=100, help="the fixed-length arm's epoch")
    p.add_argument("--cases", type=int, default=40, help="synthetic cases (fold 0 holds some out for validation)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.iterations_per_epoch < 1:
        p.error("--minutes must be > 0 and --iterations-per-epoch >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        arms = [run_arm(Path(tmp) / name, ipe, args)
                for name, ipe in (("one_pass", None), ("fixed", args.iterations_per_epoch))]
    one_pass, fixed = arms
    result = cpu_result("epoch_overhead", args, one_pass=one_pass, fixed_length=fixed,
                        speedup=fixed["iterations_per_minute"] / one_pass["iterations_per_minute"])
    print(f"one-pass epochs ({one_pass['epoch_length']} batches): {one_pass['iterations_per_minute']:.0f} it/min; "
          f"{fixed['epoch_length']}-batch epochs: {fixed['iterations_per_minute']:.0f} it/min "
          f"({result['speedup']:.2f}x)")
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
