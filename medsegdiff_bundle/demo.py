"""The built-in demo, run through the MONAI bundle: generate data, train, evaluate on the held-out fold.

``medsegdiff demo`` writes a synthetic dataset (fold 0 held out), runs ``bundle/configs/train.json`` and then
``bundle/configs/evaluate.json`` with ``output_dir`` as ``bundle_root``. It runs on CPU in a few minutes.
Outputs in ``output_dir``:

* ``data/`` the generated images, labels and ``datalist.json``
* ``models/`` checkpoints (model, EMA, optimizer, scheduler, trainer state) and ``model.pt`` (best EMA weights)
* ``eval/training_log.csv``, ``eval/validation_log.csv`` (sampled and anchor Dice), ``eval/training_curves.png``
* ``eval/evaluation/<case>_seg``, ``<case>_uncertainty`` (PNG in 2D, NIfTI in 3D), ``<case>_overlay.png``,
  ``metrics.csv`` (per case and class), ``metrics_summary.md``, ``failed_cases.csv``
* ``summary.json``
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .data.synthetic import write_synthetic_dataset
from .engine.workflow import run_bundle

__all__ = ["run_demo"]


def run_demo(
    output_dir: str = "demo_output",
    spatial_dims: int = 2,
    num_classes: int = 2,
    image_size: int | None = None,
    num_cases: int = 40,
    iterations: int = 600,
    batch_size: int = 8,
    channels: Sequence[int] = (16, 32, 64),
    lr: float = 2e-3,
    sampler: str = "dpmpp",
    steps: int = 20,
    ensemble: int = 5,
    seed: int = 0,
    device: str | None = None,
) -> dict[str, Any]:
    """Generate data, train and evaluate through the bundle; returns the summary (also in ``summary.json``).

    Args:
        output_dir: the bundle root of the run (created).
        spatial_dims: 2 (RGB images) or 3 (one-channel volumes).
        num_classes: classes including background.
        image_size: edge length (default 64 in 2D, 32 in 3D).
        num_cases: generated cases; fold 0 (a fifth) is held out for validation and evaluation.
        iterations: approximate optimiser steps (rounded up to whole epochs).
        batch_size: training batch size.
        channels: UNet widths per level.
        lr: AdamW learning rate.
        sampler: ``dpmpp``, ``ddim`` or ``ddpm``.
        steps: sampler steps (``ddpm`` needs 1000).
        ensemble: ensemble members per case.
        seed: seed of data, initialisation, training noise and sampling.
        device: ``cpu``/``cuda``; default: CUDA when available.
    """
    from .diffusion import DiffusionSampler

    DiffusionSampler(sampler, steps, ensemble)  # refuse bad sampling options before training
    started = time.time()
    root = Path(output_dir).resolve()
    size = image_size or (64 if spatial_dims == 2 else 32)
    in_channels = 3 if spatial_dims == 2 else 1
    datalist = write_synthetic_dataset(root / "data", num_cases, (size,) * spatial_dims, num_classes, in_channels, seed)
    n_train = sum(1 for c in json.loads(datalist.read_text(encoding="utf-8"))["training"] if c["fold"] != 0)
    epochs = max(1, math.ceil(iterations / max(1, math.ceil(n_train / batch_size))))
    common = {
        "datalist": str(datalist),
        "dataset_dir": str(root / "data"),
        "spatial_dims": spatial_dims,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "patch_size": [size] * spatial_dims,
        "normalization": "none" if spatial_dims == 2 else "zscore",  # generated 2D images are already in [0, 1]
        "channels": list(channels),
        "seed": seed,
        "num_workers": 0,
        "device": f"$torch.device('{device or ('cuda' if torch.cuda.is_available() else 'cpu')}')",
    }
    run_bundle("train", "train", root, **common, batch_size=batch_size, max_epochs=epochs, learning_rate=lr,
               val_interval=max(1, epochs // 4), val_steps=5)
    train_seconds = time.time() - started
    run_bundle("evaluate", "infer", root, **common, sampler=sampler, steps=steps, ensemble=ensemble)
    table = pd.read_csv(root / "eval" / "evaluation" / "metrics.csv")
    per_case = table.groupby("case")[["dice", "iou"]].mean()
    summary = {
        "dice_mean": float(per_case["dice"].mean()),
        "iou_mean": float(per_case["iou"].mean()),
        "hd95_mean": float(table["hd95"].mean()),
        "cases_evaluated": int(len(per_case)),
        "epochs": epochs,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - started, 1),
        "sampler": sampler,
        "steps": steps,
        "ensemble": ensemble,
        "output_dir": str(root),
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
