"""Per-case, per-class segmentation metrics (Dice, IoU, HD95 from ``monai.metrics``) as pandas tables."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU

__all__ = ["case_metrics", "dice_scores", "summarize_metrics", "format_summary_markdown"]


def _onehot(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(label[:, 0].long(), num_classes).movedim(-1, 1).float()


def dice_scores(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice of each case and foreground class: label maps ``(B, 1, *S)`` -> ``(B, num_classes - 1)``.

    A class absent from both prediction and reference scores 1.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and reference {tuple(target.shape)} differ in shape.")
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    return metric(_onehot(pred, num_classes), _onehot(target, num_classes))


def case_metrics(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    case_ids: Sequence[str],
    spacing: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Dice, IoU and HD95 for each case and foreground class.

    Args:
        pred: predicted label maps ``(B, 1, *S)``.
        target: ground-truth label maps ``(B, 1, *S)``.
        num_classes: classes including background (background is not scored).
        case_ids: one name per case.
        spacing: voxel spacing for HD95 (voxels when ``None``).
        class_names: names of classes ``1..K-1`` (``class_1``... when ``None``).

    Returns:
        one row per (case, class) with columns ``case, class, dice, iou, hd95``. HD95 is NaN when the class is
        absent from the prediction or the reference (a distance is undefined then); Dice/IoU of a class absent
        from both is 1.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and reference {tuple(target.shape)} differ in shape.")
    if len(case_ids) != pred.shape[0]:
        raise ValueError(f"{len(case_ids)} case ids for {pred.shape[0]} cases.")
    names = list(class_names) if class_names is not None else [f"class_{c}" for c in range(1, num_classes)]
    dice = dice_scores(pred, target, num_classes)
    p, t = _onehot(pred, num_classes), _onehot(target, num_classes)
    iou = MeanIoU(include_background=False, reduction="none", ignore_empty=False)(p, t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns for empty classes; we report NaN for those instead
        hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(p, t, spacing=spacing)
    hd = torch.where(torch.isfinite(hd), hd, torch.full_like(hd, float("nan")))
    rows = []
    for b, case in enumerate(case_ids):
        for c, name in enumerate(names):
            rows.append(
                {"case": case, "class": name, "dice": float(dice[b, c]), "iou": float(iou[b, c]), "hd95": float(hd[b, c])}
            )
    return pd.DataFrame(rows)


def summarize_metrics(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and std per class and over all classes: ``class, dice_mean, dice_std, ...``."""
    metrics = [c for c in ("dice", "iou", "hd95") if c in table.columns]
    per_class = table.groupby("class")[metrics].agg(["mean", "std"])
    overall = table.groupby("case")[metrics].mean().agg(["mean", "std"]).unstack().to_frame().T
    overall.index = ["mean (all classes)"]
    out = pd.concat([per_class, overall])
    out.columns = [f"{m}_{s}" for m, s in out.columns]
    return out.rename_axis("class").reset_index()


def format_summary_markdown(summary: pd.DataFrame) -> str:
    """``mean ± std`` per metric as a Markdown table."""
    metrics = sorted({c.rsplit("_", 1)[0] for c in summary.columns if c.endswith("_mean")}, key=["dice", "iou", "hd95"].index)
    table = pd.DataFrame({"class": summary["class"]})
    for m in metrics:
        table[m] = [
            "n/a" if np.isnan(mu) else f"{mu:.4f} ± {0.0 if np.isnan(sd) else sd:.4f}"
            for mu, sd in zip(summary[f"{m}_mean"], summary[f"{m}_std"])
        ]
    return table.to_markdown(index=False)
