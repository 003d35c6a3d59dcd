"""Evaluation: metric tables and pictures."""

from .metrics import case_metrics, format_summary_markdown, summarize_metrics
from .visualize import representative_slice, save_overlay, save_training_curves

__all__ = ["case_metrics", "format_summary_markdown", "representative_slice", "save_overlay", "save_training_curves", "summarize_metrics"]
