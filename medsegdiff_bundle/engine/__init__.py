"""MONAI engine glue: training iteration, EMA, inferer, handlers, checkpoints."""

from .checkpoint import atomic_save, load_checkpoint
from .ema import EMAModel, unwrap_model
from .fastpath import (
    COMPILE_MODES,
    CompiledNetwork,
    bf16_is_fast,
    channels_last_format,
    compile_network_calls,
    compile_training_calls,
    replays_cudagraphs,
    to_channels_last,
    without_cudagraphs,
)
from .fault_tolerance import FaultTolerantDataset, SkipFailedCases, collate_skip_failed
from .handlers import (
    LoopTimingHandler,
    MetricsTableHandler,
    TimeBudgetHandler,
    TrainingCurvesHandler,
    latest_checkpoint,
    resume_from_latest,
)
from .inferer import DiffusionSegInferer
from .schedule import ProgressCosineLR, cosine_annealed, run_progress
from .warmup import ConditionWarmup
from .iteration import DiffusionTrainIteration, EMAUpdateHandler, EpochSeedHandler, samples_per_epoch
from .workflow import BUNDLE_CONFIGS, bundle_workflow, run_bundle

__all__ = [
    "BUNDLE_CONFIGS",
    "COMPILE_MODES",
    "CompiledNetwork",
    "ConditionWarmup",
    "DiffusionSegInferer",
    "DiffusionTrainIteration",
    "EMAModel",
    "EMAUpdateHandler",
    "FaultTolerantDataset",
    "EpochSeedHandler",
    "LoopTimingHandler",
    "MetricsTableHandler",
    "ProgressCosineLR",
    "SkipFailedCases",
    "TimeBudgetHandler",
    "TrainingCurvesHandler",
    "atomic_save",
    "bf16_is_fast",
    "bundle_workflow",
    "channels_last_format",
    "collate_skip_failed",
    "compile_network_calls",
    "compile_training_calls",
    "cosine_annealed",
    "latest_checkpoint",
    "load_checkpoint",
    "replays_cudagraphs",
    "resume_from_latest",
    "run_bundle",
    "run_progress",
    "samples_per_epoch",
    "to_channels_last",
    "unwrap_model",
    "without_cudagraphs",
]
