#!/usr/bin/env python
"""How fast the bundle's 2D training pipeline feeds the GPU with each ``dataset_cache`` (none, memory, disk).

For each cache this builds the dataset as ``train.json`` does (``medsegdiff_bundle.data.build_dataset`` over
``build_preprocessing(..., "train")``), then measures

* ``build_s``: building it (``memory`` loads every case here, ``disk`` writes each case on its first read, so the
  first pass is timed separately as ``first_pass_ms_per_sample``);
* ``ms_per_sample``: one sample in the main process, one thread, after the first pass (the work one loader worker
  does per image);
* ``loader_img_per_s``: a ``DataLoader`` with ``--num-workers`` workers and ``--batch-size``, over ``--batches``
  batches after one warm-up batch.

On Kvasir-SEG (``--data``, images/*.jpg + masks/*.jpg) by default, synthetic PNGs with ``--synthetic``.

Example::

    python benchmarks/data_cache.py --out benchmarks/results/data_cache_cpu-2c_2026-11-26.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from cpu_result import cpu_result, write_result  # also puts the repository root on sys.path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "Kvasir-SEG"


def kvasir_cases(folder: Path, limit: int) -> list[dict]:
    """The first ``limit`` Kvasir-SEG cases (sorted) that have a mask."""
    images = sorted((folder / "images").glob("*.jpg"))
    cases = [{"image": str(p), "label": str(folder / "masks" / p.name)} for p in images
             if (folder / "masks" / p.name).is_file()]
    if not cases:
        raise FileNotFoundError(f"{folder}: no images/*.jpg with masks/<same name>.")
    return cases[:limit]


def measure(cases: list[dict], cache: str, cache_dir: Path, args: argparse.Namespace) -> dict:
    """Build the dataset with ``cache`` and time it, one sample, and a loader (see the module docstring)."""
    import torch
    from monai.data import DataLoader

    from medsegdiff_bundle.data import build_dataset
    from medsegdiff_bundle.data.transforms import build_preprocessing

    transform = build_preprocessing(2, "train", [args.size, args.size], 2, "rgb", label_threshold=args.label_threshold)
    start = time.perf_counter()
    dataset = build_dataset(cases, transform, cache, cache_dir, num_workers=args.num_workers or 1)
    build_s = time.perf_counter() - start
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what one loader worker has
    try:
        start = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        first = (time.perf_counter() - start) / len(dataset)
        start = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        per_sample = (time.perf_counter() - start) / len(dataset)
    finally:
        torch.set_num_threads(threads)
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=(args.batches + 1) * args.batch_size)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers)
    batches = iter(loader)
    next(batches)  # starts the workers
    start = time.perf_counter()
    for _ in range(args.batches):
        next(batches)
    loader_s = time.perf_counter() - start
    return {
        "cache": cache,
        "build_s": build_s,
        "first_pass_ms_per_sample": 1000 * first,
        "ms_per_sample": 1000 * per_sample,
        "loader_img_per_s": args.batches * args.batch_size / loader_s,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Kvasir-SEG folder")
    p.add_argument("--synthetic", action="store_true", help="synthetic PNG cases instead of --data")
    p.add_argument("--cases", type=int, default=60)
    p.add_argument("--size", type=int, default=256, help="the 2D patch size images are resized to")
    p.add_argument("--label-threshold", type=float, default=127, help="binarise 0..255 masks")
    p.add_argument("--caches", nargs="+", default=["none", "memory", "disk"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=20, help="timed loader batches")
    p.add_argument("--num-workers", type=int, default=2, help="loader workers (the bundle's default)")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default: print only)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from medsegdiff_bundle.data import DATASET_CACHES, load_datalist, write_synthetic_dataset

    args = parse_args(argv)
    unknown = [c for c in args.caches if c not in DATASET_CACHES]
    if unknown:
        raise SystemExit(f"--caches: unknown {unknown}; choose from {DATASET_CACHES}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            datalist = write_synthetic_dataset(Path(tmp) / "data", args.cases, (96, 80), seed=0)
            cases, source = load_datalist(datalist, "training", Path(tmp) / "data"), "synthetic"
        else:
            cases, source = kvasir_cases(args.data, args.cases), str(args.data)
        runs = [measure(cases, cache, Path(tmp) / "cache", args) for cache in args.caches]
    result = cpu_result("data_cache", args, data=source, runs=runs)
    for run in runs:
        print(f"{run['cache']:>6}: {run['ms_per_sample']:.2f} ms per sample (first pass "
              f"{run['first_pass_ms_per_sample']:.2f}), build {run['build_s']:.2f} s, loader with "
              f"{args.num_workers} workers {run['loader_img_per_s']:.0f} img/s")
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
