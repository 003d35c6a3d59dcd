"""MONAI engine glue: training iteration, EMA, inferer, handlers, checkpoints."""

from .checkpoint import atomic_save, load_checkpoint
from .ema import EMAModel, unwrap_model
from .fault_tolerance import FaultTolerantDataset, SkipFailedCases, collate_skip_failed
from .handlers import MetricsTableHandler, TrainingCurvesHandler, latest_checkpoint, resume_from_latest
from .inferer import DiffusionSegInferer
from .iteration import DiffusionTrainIteration, EMAUpdateHandler, EpochSeedHandler

__all__ = [
    "DiffusionSegInferer",
    "DiffusionTrainIteration",
    "EMAModel",
    "EMAUpdateHandler",
    "FaultTolerantDataset",
    "EpochSeedHandler",
    "MetricsTableHandler",
    "SkipFailedCases",
    "TrainingCurvesHandler",
    "atomic_save",
    "collate_skip_failed",
    "latest_checkpoint",
    "load_checkpoint",
    "resume_from_latest",
    "unwrap_model",
]
