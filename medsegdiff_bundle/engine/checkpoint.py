"""Checkpoint files written atomically and loaded safely (``weights_only=True``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..utils import atomic_open

__all__ = ["atomic_save", "load_checkpoint"]


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename: a crash never leaves a torn file."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code from pickles)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=True)
