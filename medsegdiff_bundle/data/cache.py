"""Datasets that keep the deterministic part of the pre-processing (loading, resampling, normalisation, resizing).

Loading and resizing a Kvasir-SEG case costs ~13 ms of one CPU core, the random augmentations after it ~2 ms: with
the bundle's two loader workers a plain ``Dataset`` delivered 129 images/s on a 2-core machine, less than the default
model trains at on one H200 (167-222 images/s; ``benchmarks/data_cache.py``). MONAI's ``CacheDataset`` (in memory) and ``PersistentDataset`` (on disk) run the
transforms up to the first random one once per case and reuse the result, so every epoch only augments.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import importlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import Compose, RandomizableTrait, Transform
from monai.utils import enums as monai_enums

__all__ = ["DATASET_CACHES", "MEMORY_CACHE_GB", "auto_cache", "build_dataset", "cached_bytes_per_case"]

DATASET_CACHES = ("auto", "none", "memory", "disk")
MEMORY_CACHE_GB = 8.0  # RAM the cached cases of all training processes on one machine may take
_GIB = 1024**3
logger = logging.getLogger(__name__)


@functools.cache
def _meta_globals() -> list:
    """What MONAI puts into a MetaTensor's meta beside tensors (numpy arrays such as ``spatial_shape``; its own string
    enums as keys of the applied operations): plain data that ``torch.load(weights_only=True)`` refuses unless
    allowed. Looked up on first use, in whichever numpy is installed (the module moved in numpy 2)."""
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 1.25
        multiarray = importlib.import_module("numpy.core.multiarray")
    dtypes = getattr(np, "dtypes", None)
    return (
        [multiarray._reconstruct, np.ndarray, np.dtype]
        + ([getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")] if dtypes is not None else [])
        + [obj for obj in vars(monai_enums).values() if isinstance(obj, type) and issubclass(obj, enum.Enum)]
    )


class _PersistentDataset(PersistentDataset):
    """``PersistentDataset`` that reads its cache with ``weights_only=True`` and the meta's types allowed, in that
    read only (the process-wide allow-list, which every checkpoint load uses, stays as it is)."""

    def _cachecheck(self, item_transformed):
        with torch.serialization.safe_globals(_meta_globals()):
            return super()._cachecheck(item_transformed)


def _deterministic_part(transform: Callable, item: dict) -> Any:
    """``item`` through ``transform`` up to its first random transform (what the caches keep)."""
    if not isinstance(transform, Compose):
        return transform(item)
    first_random = transform.get_index_of_first(
        lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform)
    )
    return transform(item, end=first_random)


def _tensor_bytes(item: Any) -> int:
    """Bytes of the arrays in a (nested) sample."""
    if isinstance(item, (torch.Tensor, np.ndarray)):
        return int(item.nbytes)
    if isinstance(item, dict):
        return sum(_tensor_bytes(v) for v in item.values())
    if isinstance(item, (list, tuple)):
        return sum(_tensor_bytes(v) for v in item)
    return 0


def auto_cache(data: Sequence[dict], transform: Callable, cache_dir: str | os.PathLike | None = None) -> str:
    """The cache ``"auto"`` resolves to: ``"memory"`` when all cases, sized by the first one, fit this process's
    share of ``MEMORY_CACHE_GB`` (divided among the ``LOCAL_WORLD_SIZE`` processes ``torchrun`` starts on a machine),
    else ``"disk"`` (or ``"none"`` without a ``cache_dir``). Costs one case's loading. Each dataset decides alone:
    ``train.json``'s training and validation sets may each take the share (the validation fold, one of five, is a
    quarter of the training set's size)."""
    if len(data) == 0:
        return "none"
    per_case = _tensor_bytes(_deterministic_part(transform, dict(data[0])))
    share = MEMORY_CACHE_GB * _GIB / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    total = per_case * len(data)
    choice = "memory" if total <= share else ("disk" if cache_dir else "none")
    logger.info(f"dataset_cache auto: {len(data)} cases x {per_case / 2**20:.1f} MiB = {total / _GIB:.2f} GiB "
                f"(this process may keep {share / _GIB:.1f} GiB in memory) -> {choice}")
    return choice


def build_dataset(
    data: Sequence[dict],
    transform: Callable,
    cache: str = "none",
    cache_dir: str | os.PathLike | None = None,
    num_workers: int = 1,
) -> Dataset:
    """A dataset of ``data`` under ``transform`` with the chosen cache.

    The cached datasets hand the random transforms exactly what a plain ``Dataset`` would, so a run gives the same
    batches whichever cache it uses (tested), and resuming stays exact.

    Args:
        data: the cases (dicts of file names).
        transform: the full pre-processing; what precedes its first random transform is cached.
        cache: ``"auto"`` (:func:`auto_cache`: memory if it fits, else disk), ``"none"`` (load every case every
            epoch), ``"memory"`` (``CacheDataset``: all cases built once, in
            parallel with a progress bar, before training starts; held in RAM by every process) or ``"disk"``
            (``PersistentDataset``: each case written the first time it is read, into a sub-folder of ``cache_dir``
            named by a hash of the pipeline's ``settings`` (what :func:`~medsegdiff_bundle.data.transforms.
            build_preprocessing` records: patch size, spacing, normalisation, ...), so a changed pipeline never
            reads a stale cache; a pipeline without ``settings`` uses ``cache_dir`` itself).
        cache_dir: folder of the ``"disk"`` cache (required for it).
        num_workers: threads that build the ``"memory"`` cache.

    Raises:
        ValueError: an unknown ``cache``, or ``"disk"`` without ``cache_dir``.
    """
    if cache not in DATASET_CACHES:
        raise ValueError(f"dataset_cache must be one of {DATASET_CACHES}, got {cache!r}.")
    if cache == "auto":
        cache = auto_cache(data, transform, cache_dir)
    if cache == "memory":
        return CacheDataset(data, transform, num_workers=max(1, int(num_workers)), progress=True)
    if cache == "disk":
        if cache_dir is None or str(cache_dir) == "":
            raise ValueError('dataset_cache "disk" needs a cache_dir.')
        folder = Path(cache_dir)
        settings = getattr(transform, "settings", None)
        if settings is not None:
            folder = folder / hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        # not MONAI's hash_transform: it builds a new Compose, which reseeds the shared random transforms (so the
        # samples would differ from the uncached run), and it hashes only the transforms' names.
        # track_meta keeps the MetaTensors (affine, original shape, file name) that error messages and inversion read
        return _PersistentDataset(data, transform, cache_dir=folder, track_meta=True)
    return Dataset(data, transform)


def cached_bytes_per_case(shape: Sequence[int], in_channels: int) -> float:
    """Bytes one cached case takes: the float32 image channels plus the label, at ``shape`` (spatial)."""
    return float(np.prod([int(s) for s in shape], dtype=np.float64)) * (int(in_channels) + 1) * 4
