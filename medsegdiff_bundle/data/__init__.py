"""Data: datalists and case checks, transform pipelines, synthetic generator."""

from .cache import DATASET_CACHES, build_dataset
from .converters import assign_folds, convert, list_datasets
from .datalist import (
    case_name,
    cases_from_folder,
    check_case,
    find_cases,
    load_datalist,
    output_name,
    output_root,
    select_fold,
    validate_cases,
)
from .synthetic import ensure_synthetic_datalist, make_synthetic_case, make_synthetic_dataset, write_synthetic_dataset

__all__ = [
    "DATASET_CACHES",
    "build_dataset",
    "assign_folds",
    "convert",
    "list_datasets",
    "case_name",
    "cases_from_folder",
    "check_case",
    "ensure_synthetic_datalist",
    "find_cases",
    "load_datalist",
    "make_synthetic_case",
    "make_synthetic_dataset",
    "output_name",
    "output_root",
    "select_fold",
    "validate_cases",
    "write_synthetic_dataset",
]
