"""Evaluation: metric tables, post-processing chosen on validation cases, and pictures."""

from .anchor_blend import DEFAULT_ANCHOR_WEIGHTS, anchor_weight_sweep, best_anchor_weight
from .metrics import case_metrics, dice_scores, format_summary_markdown, summarize_metrics
from .postprocessing import (
    CANDIDATES,
    component_candidates,
    dice_under_plan,
    load_postprocessing_plan,
    plan_summary,
    plan_transforms,
    select_postprocessing,
)
from .trajectory import denoising_trajectory
from .visualize import (
    radiological_axial,
    representative_slice,
    save_overlay,
    save_training_curves,
    save_trajectory_plot,
)

__all__ = [
    "CANDIDATES", "DEFAULT_ANCHOR_WEIGHTS", "anchor_weight_sweep", "best_anchor_weight", "case_metrics",
    "component_candidates", "denoising_trajectory", "dice_scores", "dice_under_plan", "format_summary_markdown",
    "load_postprocessing_plan", "plan_summary", "plan_transforms", "radiological_axial", "representative_slice",
    "save_overlay", "save_training_curves", "save_trajectory_plot", "select_postprocessing", "summarize_metrics",
]
