"""Planning (nnU-Net style): dataset fingerprint -> measured memory model -> plans.json + bundle overrides."""

from .fingerprint import FINGERPRINT_VERSION, extract_fingerprint, load_fingerprint, save_fingerprint
from .memory import MemoryEstimate, count_parameters, load_memory_model, predict_training_memory
from .planner import PLANS_VERSION, bundle_overrides, load_plans, plan_dataset, save_plans

__all__ = [
    "FINGERPRINT_VERSION",
    "PLANS_VERSION",
    "MemoryEstimate",
    "bundle_overrides",
    "count_parameters",
    "extract_fingerprint",
    "load_fingerprint",
    "load_memory_model",
    "load_plans",
    "plan_dataset",
    "predict_training_memory",
    "save_fingerprint",
    "save_plans",
]
