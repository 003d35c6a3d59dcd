"""How much of the condition model's own segmentation to blend into the diffusion ensemble.

The condition UNet's anchor is a complete segmentation that needs no sampling, and the official MedSegDiff code
always mixes it into its final mask. Whether that helps depends on how well each part has trained, so the weight
(``DiffusionSampler(anchor_weight=w)``) is a measured choice: sample once, score every blend
``(1 - w) * ensemble + w * anchor`` against the reference, and take the best ``w`` on validation cases, never on
the test cases it will be reported on.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from ..diffusion.ensemble import fuse
from ..diffusion.labels import probs_to_label, validate_label
from ..diffusion.sampler import DiffusionSampler
from ..networks.medsegdiff import MedSegDiffV2
from .metrics import dice_scores

__all__ = ["DEFAULT_ANCHOR_WEIGHTS", "anchor_weight_sweep", "best_anchor_weight"]

DEFAULT_ANCHOR_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


@torch.no_grad()
def anchor_weight_sweep(
    network: MedSegDiffV2,
    sampler: DiffusionSampler,
    image: torch.Tensor,
    label: torch.Tensor,
    weights: Sequence[float] = DEFAULT_ANCHOR_WEIGHTS,
) -> tuple[pd.DataFrame, float]:
    """Dice of each anchor blend from one sampling run.

    Args:
        network: a trained MedSegDiff-V2 (put in eval mode by the caller).
        sampler: the sampler to blend with; its own ``anchor_weight`` is ignored (the ensemble is taken unblended).
        image: ``(B, C_in, *S)`` at the network's working size.
        label: integer reference ``(B, 1, *S)`` at the same size.
        weights: anchor weights to score, each in ``[0, 1]``.

    Returns:
        a table with one row per weight (``anchor_weight``, ``dice``: mean over cases and foreground classes) and the
        best weight (the smallest one on a tie, so the anchor enters only where it helps).
    """
    weights = [float(w) for w in weights]
    if not weights:
        raise ValueError("weights must name at least one anchor weight.")
    bad = [w for w in weights if not 0.0 <= w <= 1.0]
    if bad:
        raise ValueError(f"anchor weights must be in [0, 1], got {bad}.")
    num_classes = network.num_classes
    label = validate_label(label, num_classes).cpu()
    if image.shape[0] != label.shape[0] or image.shape[2:] != label.shape[2:]:
        raise ValueError(f"image {tuple(image.shape)} and label {tuple(label.shape)} differ in batch or spatial size.")
    result = sampler(network, image)
    # the sampler's own blend, if any, is undone by re-fusing from its members
    ensemble = fuse(result.members, sampler.fusion).cpu()
    anchor = result.anchor.to(ensemble.dtype).cpu()
    rows = []
    for w in sorted(set(weights)):
        blend = torch.lerp(ensemble, anchor, w)
        rows.append({"anchor_weight": w, "dice": float(dice_scores(probs_to_label(blend), label, num_classes).mean())})
    table = pd.DataFrame(rows)
    return table, best_anchor_weight(table)


def best_anchor_weight(table: pd.DataFrame) -> float:
    """The weight with the highest Dice in an :func:`anchor_weight_sweep` table, the smallest one on a tie."""
    table = table.sort_values("anchor_weight", kind="stable")
    return float(table.loc[table["dice"].idxmax(), "anchor_weight"])  # idxmax: the first of the ties
