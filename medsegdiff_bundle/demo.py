"""The built-in demo: train a small MedSegDiff-V2 on generated data, sample the held-out cases, write results.

Runs on CPU in a few minutes. Outputs in ``output_dir``:

* ``model.pt`` (EMA weights and config; written atomically), ``training_log.csv``, ``training_curves.png``
* ``predictions/<case>_pred.{png,nii.gz}`` label maps and ``<case>_uncertainty.{png,nii.gz}`` uncertainty maps
* ``overlays/<case>.png``: image, prediction vs reference contours, uncertainty heat map
* ``metrics.csv`` (per case and class), ``metrics_summary.csv`` and ``metrics_summary.md`` (mean ± std)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from .data.synthetic import make_synthetic_dataset
from .diffusion import DiffusionSampler, MedSegDiffLoss, diffusion_forward, make_scheduler, probs_to_label
from .engine.checkpoint import atomic_save
from .evaluation import case_metrics, format_summary_markdown, save_overlay, save_training_curves, summarize_metrics
from .networks import MedSegDiffV2

__all__ = ["run_demo"]

logger = logging.getLogger(__name__)


def _write_map(path: Path, array: np.ndarray, scale_to_uint8: bool = False) -> None:
    """2D maps as PNG (label values kept; float maps scaled to 0..255), 3D maps as NIfTI."""
    if array.ndim == 2:
        from PIL import Image

        out = np.clip(array / max(float(array.max()), 1e-8), 0, 1) * 255 if scale_to_uint8 else array
        Image.fromarray(out.astype(np.uint8)).save(path.with_suffix(".png"))
    else:
        import nibabel as nib

        nib.save(nib.Nifti1Image(array.astype(np.float32 if scale_to_uint8 else np.uint8), np.eye(4)), f"{path}.nii.gz")


def run_demo(
    output_dir: str = "demo_output",
    spatial_dims: int = 2,
    num_classes: int = 2,
    image_size: int | None = None,
    train_cases: int = 48,
    test_cases: int = 8,
    iterations: int = 600,
    batch_size: int = 8,
    channels: Sequence[int] = (16, 32, 64),
    lr: float = 2e-3,
    ema_decay: float = 0.99,
    prediction_type: str = "sample",
    sampler: str = "dpmpp",
    steps: int = 20,
    ensemble: int = 5,
    seed: int = 0,
    device: str | None = None,
) -> dict[str, Any]:
    """Train, sample and evaluate on synthetic data; returns the summary (also written to ``summary.json``).

    Args:
        output_dir: where results go (created).
        spatial_dims: 2 or 3.
        num_classes: classes including background.
        image_size: edge length (default 64 in 2D, 32 in 3D).
        train_cases: generated training cases.
        test_cases: generated held-out cases (different seeds).
        iterations: optimiser steps.
        batch_size: training batch size.
        channels: UNet widths per level.
        lr: AdamW learning rate.
        ema_decay: EMA decay of the weights used for sampling.
        prediction_type: network target, ``"sample"`` (x0) or ``"epsilon"`` (noise).
        sampler: ``dpmpp``, ``ddim`` or ``ddpm``.
        steps: sampler steps (``ddpm`` needs 1000).
        ensemble: ensemble members per image.
        seed: seed for data, initialisation, training noise and sampling.
        device: ``cpu``/``cuda``; default: CUDA when available.
    """
    started = time.time()
    out = Path(output_dir)
    for sub in ("predictions", "overlays"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = image_size or (64 if spatial_dims == 2 else 32)
    in_channels = 3 if spatial_dims == 2 else 1
    shape = (size,) * spatial_dims
    torch.manual_seed(seed)

    train = make_synthetic_dataset(train_cases, shape, num_classes, in_channels, seed=seed)
    test = make_synthetic_dataset(test_cases, shape, num_classes, in_channels, seed=seed + 100_000)
    train_img = torch.from_numpy(np.stack([c["image"] for c in train])).to(dev)
    train_lab = torch.from_numpy(np.stack([c["label"] for c in train]).astype(np.int64)).to(dev)

    sampling = DiffusionSampler(sampler, steps, ensemble, prediction_type=prediction_type, seed=seed)  # fail fast
    config = {"spatial_dims": spatial_dims, "in_channels": in_channels, "num_classes": num_classes, "channels": list(channels)}
    diffusion_config = {"prediction_type": prediction_type, "schedule": "linear_beta", "num_train_timesteps": 1000}
    network = MedSegDiffV2(**config).to(dev)
    ema = AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(ema_decay))
    scheduler = make_scheduler("ddpm", prediction_type=prediction_type)
    loss_fn = MedSegDiffLoss(num_classes)
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=1e-4)
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations, eta_min=lr * 0.05)
    generator = torch.Generator(device=dev).manual_seed(seed)

    history: dict[str, list[float]] = {"iteration": [], "loss": [], "diffusion": [], "anchor": []}
    network.train()
    for it in (bar := tqdm(range(iterations), desc="training", unit="it")):
        idx = torch.randint(0, train_cases, (batch_size,), generator=generator, device=dev)
        losses = diffusion_forward(network, scheduler, loss_fn, train_img[idx], train_lab[idx], generator)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        ema.update_parameters(network)
        history["iteration"].append(it)
        for key in ("loss", "diffusion", "anchor"):
            history[key].append(float(losses[key].detach()))
        if it % 20 == 0:
            bar.set_postfix(loss=f"{history['loss'][-1]:.4f}")
    train_seconds = time.time() - started
    pd.DataFrame(history).to_csv(out / "training_log.csv", index=False)
    save_training_curves(out / "training_curves.png", history)
    model = ema.module.eval()
    atomic_save({"network": model.state_dict(), "config": config, "diffusion": diffusion_config}, out / "model.pt")

    case_ids = [f"case_{i:03d}" for i in range(test_cases)]
    preds, uncs = [], []
    sample_started = time.time()
    for i in tqdm(range(test_cases), desc=f"sampling ({sampler}, {steps} steps, ensemble {ensemble})", unit="case"):
        image = torch.from_numpy(test[i]["image"][None]).to(dev)
        result = sampling(model, image)
        preds.append(probs_to_label(result.probs).cpu())
        uncs.append(result.uncertainty.cpu())
    sample_seconds = (time.time() - sample_started) / max(test_cases, 1)
    pred = torch.cat(preds)
    ref = torch.from_numpy(np.stack([c["label"] for c in test]).astype(np.int64))
    table = case_metrics(pred, ref, num_classes, case_ids)
    summary_table = summarize_metrics(table)
    table.to_csv(out / "metrics.csv", index=False)
    summary_table.to_csv(out / "metrics_summary.csv", index=False)
    (out / "metrics_summary.md").write_text(format_summary_markdown(summary_table) + "\n", encoding="utf-8")

    for i, case in enumerate(case_ids):
        p, u = pred[i, 0].numpy(), uncs[i][0, 0].numpy()
        _write_map(out / "predictions" / f"{case}_pred", p)
        _write_map(out / "predictions" / f"{case}_uncertainty", u, scale_to_uint8=True)
        dice = table[table["case"] == case]["dice"].mean()
        save_overlay(out / "overlays" / f"{case}.png", test[i]["image"], p, test[i]["label"][0], u, f"{case}  Dice {dice:.3f}")

    summary = {
        "dice_mean": float(table.groupby("case")["dice"].mean().mean()),
        "iou_mean": float(table.groupby("case")["iou"].mean().mean()),
        "hd95_mean": float(table["hd95"].mean()),
        "train_seconds": round(train_seconds, 1),
        "sampling_seconds_per_case": round(sample_seconds, 3),
        "sampler": sampler,
        "steps": steps,
        "ensemble": ensemble,
        "device": str(dev),
        "config": config,
        "output_dir": str(out.resolve()),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
