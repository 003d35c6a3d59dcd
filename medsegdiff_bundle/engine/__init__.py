"""MONAI engine glue: training iteration, EMA, inferer, handlers, checkpoints."""

from .checkpoint import atomic_save, load_checkpoint
from .ema import EMAModel, unwrap_model
from .fault_tolerance import FaultTolerantDataset, SkipFailedCases, collate_skip_failed
from .handlers import MetricsTableHandler, TimeBudgetHandler, TrainingCurvesHandler, latest_checkpoint, resume_from_latest
from .inferer import DiffusionSegInferer
from .iteration import DiffusionTrainIteration, EMAUpdateHandler, EpochSeedHandler
from .workflow import BUNDLE_CONFIGS, bundle_workflow, run_bundle

__all__ = [
    "BUNDLE_CONFIGS",
    "DiffusionSegInferer",
    "DiffusionTrainIteration",
    "EMAModel",
    "EMAUpdateHandler",
    "FaultTolerantDataset",
    "EpochSeedHandler",
    "MetricsTableHandler",
    "SkipFailedCases",
    "TimeBudgetHandler",
    "TrainingCurvesHandler",
    "atomic_save",
    "bundle_workflow",
    "collate_skip_failed",
    "latest_checkpoint",
    "load_checkpoint",
    "resume_from_latest",
    "run_bundle",
    "unwrap_model",
]
