"""Diffusion process: label encoding, schedulers and samplers, ensemble fusion, test-time mirroring, training
objective."""

from .ensemble import FUSIONS, UNCERTAINTIES, fuse, uncertainty
from .labels import (
    channel_to_class_probs, label_to_x0, mask_channels, probs_to_label, round_x0, validate_label, x0_to_probs,
)
from .losses import MedSegDiffLoss
from .mirroring import mirror_views, mirrored_mean
from .sampler import DiffusionSampler, SampleResult
from .schedulers import PREDICTION_TYPES, SAMPLERS, DPMSolverPPScheduler, TrailingDDIMScheduler, make_scheduler
from .training import diffusion_forward, sample_timesteps

__all__ = [
    "FUSIONS",
    "PREDICTION_TYPES",
    "SAMPLERS",
    "UNCERTAINTIES",
    "DPMSolverPPScheduler",
    "DiffusionSampler",
    "MedSegDiffLoss",
    "SampleResult",
    "TrailingDDIMScheduler",
    "channel_to_class_probs",
    "diffusion_forward",
    "sample_timesteps",
    "fuse",
    "label_to_x0",
    "make_scheduler",
    "mask_channels",
    "mirror_views",
    "mirrored_mean",
    "probs_to_label",
    "round_x0",
    "uncertainty",
    "validate_label",
    "x0_to_probs",
]
