"""Where a trained model gains or loses accuracy along the sampling chain.

The first step of a sampler sees pure noise, so its predicted ``x0`` is the network's reading of the image alone;
every later step also sees its own earlier estimate, re-noised. Scoring the predicted ``x0`` of every step against
the reference shows whether the chain refines that first reading (Dice rises) or drifts away from it (Dice falls),
next to the condition model's anchor, which needs no sampling at all.
"""

from __future__ import annotations

import pandas as pd
import torch

from ..diffusion.labels import probs_to_label, validate_label, x0_to_probs
from ..diffusion.sampler import DiffusionSampler
from ..networks.medsegdiff import MedSegDiffV2
from .metrics import dice_scores

__all__ = ["denoising_trajectory"]


@torch.no_grad()
def denoising_trajectory(
    network: MedSegDiffV2, sampler: DiffusionSampler, image: torch.Tensor, label: torch.Tensor
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Dice of the ensemble-mean predicted mask after every sampler step, plus the anchor's and the final Dice.

    Args:
        network: a trained MedSegDiff-V2 (put in eval mode by the caller).
        sampler: the sampler to follow (its ensemble size and seed are used).
        image: ``(B, C_in, *S)`` at the network's working size.
        label: integer reference ``(B, 1, *S)`` at the same size.

    Returns:
        a table with one row per step (``step``, ``timestep``, ``dice``: mean over cases and foreground classes) and
        a summary ``{"anchor_dice", "first_step_dice", "best_step_dice", "final_dice"}``.
    """
    num_classes = network.num_classes
    label = validate_label(label, num_classes)
    if image.shape[0] != label.shape[0] or image.shape[2:] != label.shape[2:]:
        raise ValueError(f"image {tuple(image.shape)} and label {tuple(label.shape)} differ in batch or spatial size.")
    b, n = image.shape[0], sampler.ensemble

    reference = label.cpu()  # scored on the host once per step; move the reference there once

    def score(probs: torch.Tensor) -> float:
        return float(dice_scores(probs_to_label(probs).cpu(), reference, num_classes).mean())

    rows: list[dict] = []

    def record(step: int, timestep: int, x0: torch.Tensor) -> None:
        probs = x0_to_probs(x0, num_classes)
        mean = probs.reshape(b, n, *probs.shape[1:]).mean(dim=1)
        rows.append({"step": step, "timestep": int(timestep), "dice": score(mean)})

    result = sampler(network, image, callback=record)
    table = pd.DataFrame(rows)
    summary = {
        "anchor_dice": score(result.anchor),
        "first_step_dice": float(table["dice"].iloc[0]),
        "best_step_dice": float(table["dice"].max()),
        "final_dice": score(result.probs),
    }
    return table, summary
