"""Evaluation: metric tables and pictures."""

from .anchor_blend import DEFAULT_ANCHOR_WEIGHTS, anchor_weight_sweep, best_anchor_weight
from .metrics import case_metrics, dice_scores, format_summary_markdown, summarize_metrics
from .trajectory import denoising_trajectory
from .visualize import (
    radiological_axial,
    representative_slice,
    save_overlay,
    save_training_curves,
    save_trajectory_plot,
)

__all__ = [
    "DEFAULT_ANCHOR_WEIGHTS", "anchor_weight_sweep", "best_anchor_weight", "case_metrics", "denoising_trajectory",
    "dice_scores", "format_summary_markdown", "radiological_axial", "representative_slice", "save_overlay",
    "save_training_curves", "save_trajectory_plot", "summarize_metrics",
]
