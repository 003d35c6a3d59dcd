"""Engine glue: checkpoints (the MONAI trainer/inferer glue lives here too)."""

from .checkpoint import atomic_save, load_checkpoint

__all__ = ["atomic_save", "load_checkpoint"]
