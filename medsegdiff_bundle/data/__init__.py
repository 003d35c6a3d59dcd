"""Data: synthetic generator (readers, transforms and converters join here)."""

from .synthetic import make_synthetic_case, make_synthetic_dataset, write_synthetic_dataset

__all__ = ["make_synthetic_case", "make_synthetic_dataset", "write_synthetic_dataset"]
