#!/usr/bin/env python
"""How fast a condition-UNet backbone learns to segment on its own, against a MONAI DynUNet.

MedSegDiff-V2's condition UNet produces the anchor segmentation, and at short training budgets the diffusion model's
output follows it. This trains each ``--models`` entry alone, exactly alike: the anchor loss (sigmoid Dice + BCE,
``MedSegDiffLoss.anchor_loss``), AdamW (``--lr``, weight decay 1e-4), ``--batch-size``, the bundle's 2D training
augmentation at ``--size``², ``--iterations`` steps, then scores the Dice of the thresholded logits on held-out
cases at ``--size``².

Models: ``plain`` (:class:`~medsegdiff_bundle.networks.PlainUNet`, the default condition backbone since bundle 0.4.0)
and ``residual`` (:class:`~medsegdiff_bundle.networks.ResidualUNet` without time input, the backbone before), both at
``--channels``; ``dynunet`` (``benchmarks/quality.py``'s nnU-Net-like topology for ``--size``, filters 32..320).

Kvasir-SEG cases: the training ids of ``benchmarks/splits/kvasir_seg_split.json`` (no test case is used); those at
index ``j % 20 in (0, 10)`` are held out (50 cases), the others train. ``--synthetic`` uses generated cases instead.

Example (2-core CPU, about 10 minutes)::

    python benchmarks/condition_probe.py --models residual plain dynunet --iterations 300 \\
        --out benchmarks/results/condition_probe_cpu-2c_2026-11-26.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from cpu_result import cpu_result, write_result  # also puts the repository root on sys.path

MODELS = ("plain", "residual", "dynunet")


def kvasir_probe_cases(data: Path) -> tuple[list[dict], list[dict]]:
    """(train, held-out) cases from the fixed split's training ids (see the module docstring)."""
    import quality

    split = quality.load_checked_split(data)

    def case(cid: str) -> dict:
        return {"image": str(data / "images" / f"{cid}.jpg"), "label": str(data / "masks" / f"{cid}.jpg")}

    ids = split["train"]
    held_out = [case(c) for j, c in enumerate(ids) if j % 20 in (0, 10)]
    return [case(c) for j, c in enumerate(ids) if j % 20 not in (0, 10)], held_out


def build_model(name: str, args: argparse.Namespace):
    """One-channel (binary) segmenter ``name`` for RGB input."""
    if name == "plain":
        from medsegdiff_bundle.networks import PlainUNet

        return PlainUNet(2, 3, 1, args.channels)
    if name == "residual":
        from medsegdiff_bundle.networks import ResidualUNet

        return ResidualUNet(2, 3, 1, args.channels)
    import quality

    topology = quality.dynunet_topology(args.size, 320, 32)
    from monai.networks.nets import DynUNet

    return DynUNet(2, 3, 1, topology["kernel_size"], topology["strides"], topology["upsample_kernel_size"],
                   filters=topology["filters"])


def probe(name: str, train: list[dict], held_out: list[dict], args: argparse.Namespace) -> dict:
    """Train ``name`` for ``--iterations`` and score it; returns the result row."""
    import torch
    from monai.data import DataLoader, Dataset
    from monai.utils import set_determinism

    from medsegdiff_bundle.data import build_dataset
    from medsegdiff_bundle.data.transforms import build_preprocessing
    from medsegdiff_bundle.diffusion import MedSegDiffLoss

    set_determinism(args.seed)
    net = build_model(name, args)
    pre = build_preprocessing(2, "train", [args.size, args.size], 2, "rgb", label_threshold=args.label_threshold)
    dataset = build_dataset(train, pre, "memory", num_workers=max(args.num_workers, 1))
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=args.iterations * args.batch_size)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers)
    loss_fn = MedSegDiffLoss(2).anchor_loss
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    net.train()
    start = time.perf_counter()
    for step, batch in enumerate(loader, 1):
        loss = loss_fn(net(batch["image"]), batch["label"].float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"{name}: iteration {step}, loss {float(loss.detach()):.3f}", flush=True)
    train_s = time.perf_counter() - start
    val = build_preprocessing(2, "validate", [args.size, args.size], 2, "rgb", label_threshold=args.label_threshold)
    net.eval()
    scores: list[float] = []
    with torch.no_grad():
        for batch in DataLoader(Dataset(held_out, val), batch_size=args.batch_size):
            pred, truth = net(batch["image"]) > 0, batch["label"] > 0
            overlap = (pred & truth).sum((1, 2, 3)).float()
            total = (pred.sum((1, 2, 3)) + truth.sum((1, 2, 3))).float()
            scores += (2 * overlap / total.clamp_min(1)).tolist()
    return {"model": name, "parameters_m": sum(p.numel() for p in net.parameters()) / 1e6,
            "iterations": args.iterations, "train_s": train_s, "s_per_iteration": train_s / args.iterations,
            "held_out_dice": sum(scores) / len(scores), "held_out_cases": len(scores)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import quality

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=quality.DEFAULT_DATA, help="Kvasir-SEG folder")
    p.add_argument("--synthetic", action="store_true", help="generated cases instead of --data (smoke runs)")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128], help="plain / residual widths")
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label-threshold", type=float, default=127, help="binarise 0..255 masks")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="result JSON (default: print only)")
    args = p.parse_args(argv)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {MODELS}")
    return args


def main(argv: list[str] | None = None) -> dict:
    from medsegdiff_bundle.data import load_datalist, write_synthetic_dataset

    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            datalist = write_synthetic_dataset(Path(tmp) / "data", 12, (48, 40), seed=0)
            cases, source = load_datalist(datalist, "training", Path(tmp) / "data"), "synthetic"
            train, held_out = cases[:8], cases[8:]
        else:
            (train, held_out), source = kvasir_probe_cases(args.data), str(args.data)
        runs = [probe(name, train, held_out, args) for name in args.models]
    result = cpu_result("condition_probe", args, data=source, train_cases=len(train), runs=runs)
    for run in runs:
        print(f"{run['model']:>8}: Dice {run['held_out_dice']:.3f} on {run['held_out_cases']} held-out cases after "
              f"{run['iterations']} iterations, {run['s_per_iteration']:.3f} s each, {run['parameters_m']:.2f} M params")
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
