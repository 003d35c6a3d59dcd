"""Experiment planner: dataset fingerprint -> training plan (nnU-Net v2 ``ExperimentPlanner`` style).

Every rule is a small named function that can be tested alone; :func:`plan_dataset` only chains them and
:func:`save_plans` writes ``plans.json`` (human-readable, versioned) plus ``bundle_overrides.json``, a flat dict
of ``bundle/configs/train.json`` keys that MONAI's bundle runner merges on top of ``train.json``::

    python -m monai.bundle run --config_file "['bundle/configs/train.json','<dir>/bundle_overrides.json']"

Rules (constants below):

* :func:`choose_configuration`: ``"2d"`` for 2D data, ``"3d"`` for volumes -- also for strongly anisotropic ones,
  where nnU-Net still runs 3d_fullres (the bundle has no 2D-slices-of-3D mode).
* :func:`target_spacing`: the median spacing; nnU-Net's anisotropy rule replaces the out-of-plane value by the
  10th percentile of that axis's spacings (see :func:`lowres_axis_spacing` for where that number comes from).
* :func:`normalization_scheme`: ``ct`` (clip to the foreground 0.5/99.5 percentiles, z-score with the foreground
  mean/std), ``rgb`` (/255) or ``zscore`` (per image; MR and everything else), per channel.
* :func:`network_topology`: widths ``base * 2**level`` capped at ``max_width``; as many (isotropic) poolings as keep
  the smallest patch axis >= 4 at the bottleneck, at least 3 levels.
* :func:`patch_and_batch`: start from the median resampled shape (3D, within nnU-Net's 256^3-voxel box) or 256^2
  (2D, the paper's size), shrink the largest physical axis until the memory model
  (:func:`medsegdiff_bundle.planning.memory.predict_training_memory`) fits ``safety_margin * gpu_memory_gb``
  with batch 2, then take the largest batch that fits, capped by nnU-Net's 5%-of-the-dataset rule and 32 (2D) /
  8 (3D).
* :func:`sampler_settings`, :func:`ddp_settings`, :func:`training_schedule`.
* :func:`dataset_cache`: the bundle keeps the loaded, resampled, normalised cases in memory when every process's
  copy fits ``MEMORY_CACHE_GB``, else on disk.

Memory budgets are GPU budgets, predicted with **fp32 activations** even though the plan trains with AMP, an upper
bound. The AMP prediction (activations scaled by the CPU-measured bf16 ratio) held on an H200 in 2D once the
package's GroupNorm kept bf16 under CUDA autocast (bundle 0.3.0): the measured peaks at 256², batch 8-32, were
0.89-0.91× the prediction; before that change they were 1.34-1.37× it. The budget stays fp32 until 3D (cuDNN's
3D convolutions) is measured on a GPU too (see ``memory.py``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data.cache import MEMORY_CACHE_GB, cached_bytes_per_case
from ..utils import write_json_atomic
from .memory import GIB, load_memory_model, predict_training_memory

__all__ = [
    "ANISO_THRESHOLD",
    "PLANS_VERSION",
    "anisotropy",
    "bundle_normalization",
    "bundle_overrides",
    "choose_configuration",
    "dataset_batch_cap",
    "dataset_cache",
    "ddp_settings",
    "initial_patch_size",
    "load_plans",
    "lowres_axis_spacing",
    "network_topology",
    "normalization_scheme",
    "normalization_schemes",
    "num_classes_from_labels",
    "patch_and_batch",
    "plan_dataset",
    "resampled_shape",
    "sampler_settings",
    "save_plans",
    "target_spacing",
    "training_schedule",
]

PLANS_VERSION = 1
PLANS_FILE = "plans.json"
OVERRIDES_FILE = "bundle_overrides.json"

ANISO_THRESHOLD = 3.0  # nnU-Net v2 ExperimentPlanner.anisotropy_threshold
LOWRES_PERCENTILE = 10  # nnU-Net v2: out-of-plane target spacing = 10th percentile of that axis
PATCH_2D = 256  # MedSegDiff-V2 trains at 256x256
INITIAL_PATCH_VOXELS_3D = 256**3  # nnU-Net v2: initial 3D patch = spacing-proportional box of 256^3 voxels
MAX_PATCH = {2: 256, 3: 256}  # per axis
SAFETY_MARGIN = 0.85
MIN_BATCH = 2
MAX_BATCH = {2: 32, 3: 8}
DATASET_FRACTION = 0.05  # nnU-Net v2 max_dataset_covered: one batch sees at most 5% of the dataset's voxels
BASE_WIDTH = 32
MAX_WIDTH = 320
MIN_LEVELS = 3
# voxels per axis at the bottleneck (smallest axis). 2D keeps 16-31 so the SS-Former attends over a few hundred
# tokens (256 at 256², stride 16, as in our method notes); 3D keeps 4-7 (216 tokens at 96³).
MIN_BOTTLENECK = {2: 16, 3: 4}
BUNDLE_CT_WINDOW = (-175.0, 250.0)  # the bundle's fixed "ct" normalisation (data/transforms.py)
CT_WINDOW_TOLERANCE = 0.1  # fraction of the bundle window width
TARGET_ITERATIONS = 25_000
EPOCH_RANGE = (50, 1000)
VALIDATIONS_PER_RUN = 20
LEARNING_RATE = 1e-4
VALIDATION_FRACTION = 0.2  # fold 0 of 5 validates


# ------------------------------------------------------------------------------------------------ fingerprint access


def _per_channel(value: Any, num_channels: int) -> list:
    """A per-channel fingerprint entry as a list: accepts a list or a dict keyed ``"0"``, ``"1"``, ..."""
    if value is None:
        return [None] * num_channels
    if isinstance(value, Mapping):
        return [value.get(str(c), value.get(c)) for c in range(num_channels)]
    return list(value)


def _intensity(fp: Mapping) -> list:
    n = int(fp["num_channels"])
    return _per_channel(fp.get("intensity", fp.get("foreground_intensity")), n)


def _modalities(fp: Mapping) -> list[str]:
    n = int(fp["num_channels"])
    mods = _per_channel(fp.get("modality"), n)
    return [str(m) if m is not None else ("grey" if int(fp["spatial_dims"]) == 2 else "MR") for m in mods]


def _median_spacing(fp: Mapping) -> list[float]:
    return [float(s) for s in fp["spacing"]["median"]]


def _median_shape(fp: Mapping) -> list[float]:
    shape = fp.get("shape_after_crop") or fp["shape"]
    return [float(s) for s in shape["median"]]


def num_classes_from_labels(labels: Sequence[int]) -> int:
    """Classes including background: ``max(label) + 1`` (at least 2; non-contiguous values keep empty classes)."""
    return max(2, int(max(labels)) + 1) if len(labels) else 2


# --------------------------------------------------------------------------------------------------------- rules


def choose_configuration(fp: Mapping) -> str:
    """``"2d"`` for 2D data, ``"3d"`` for volumes.

    Volumes stay ``"3d"`` even when extremely anisotropic: nnU-Net still trains 3d_fullres there, and the bundle's
    3D pipeline (resampling to :func:`target_spacing`, patches) handles it; there is no 2D-on-slices mode.
    """
    dims = int(fp["spatial_dims"])
    if dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {dims}.")
    return "2d" if dims == 2 else "3d"


def anisotropy(fp: Mapping, threshold: float = ANISO_THRESHOLD) -> dict[str, Any]:
    """nnU-Net v2's anisotropy test on the median spacing and median (cropped) shape.

    The worst (largest-spacing) axis is anisotropic when its spacing exceeds ``threshold`` times the largest other
    spacing **and** its size times ``threshold`` is below the smallest other size (few thick slices).
    """
    spacing = _median_spacing(fp)
    shape = _median_shape(fp)
    axis = int(np.argmax(spacing))
    others = [i for i in range(len(spacing)) if i != axis]
    if not others:
        return {"anisotropic": False, "axis": axis, "spacing_ratio": 1.0, "size_ratio": 1.0}
    max_other_spacing = max(spacing[i] for i in others)
    min_other_size = min(shape[i] for i in others)
    aniso_spacing = spacing[axis] > threshold * max_other_spacing
    aniso_voxels = shape[axis] * threshold < min_other_size
    return {
        "anisotropic": bool(aniso_spacing and aniso_voxels),
        "axis": axis,
        "spacing_ratio": spacing[axis] / max_other_spacing,
        "size_ratio": min_other_size / max(shape[axis], 1e-8),
    }


def lowres_axis_spacing(fp: Mapping, axis: int, percentile: float = LOWRES_PERCENTILE) -> tuple[float, str]:
    """The ``percentile``-th percentile of the spacings along ``axis`` and where it came from.

    In order: the fingerprint's ``spacing_percentile_10`` (per axis, if present), the percentile of the per-case
    spacings under ``fp["cases"]`` (what nnU-Net computes), else ``spacing["min"]`` as a fallback (the 0th
    percentile: it can only make the target finer than nnU-Net's, never coarser).
    """
    if percentile == LOWRES_PERCENTILE and fp.get("spacing_percentile_10") is not None:
        return float(fp["spacing_percentile_10"][axis]), "spacing_percentile_10"
    cases = fp.get("cases") or []
    values = [c["spacing"][axis] for c in cases if isinstance(c, Mapping) and c.get("spacing") is not None]
    if values:
        return float(np.percentile(np.asarray(values, dtype=np.float64), percentile)), "cases"
    return float(fp["spacing"]["min"][axis]), "spacing_min"


def target_spacing(fp: Mapping, threshold: float = ANISO_THRESHOLD) -> list[float]:
    """Median spacing; with anisotropy (:func:`anisotropy`) the worst axis gets :func:`lowres_axis_spacing`
    instead, but never finer than the largest other spacing (+1e-5), as in nnU-Net v2."""
    spacing = _median_spacing(fp)
    if int(fp["spatial_dims"]) == 3:
        aniso = anisotropy(fp, threshold)
        if aniso["anisotropic"]:
            axis = aniso["axis"]
            value, _ = lowres_axis_spacing(fp, axis)
            max_other = max(s for i, s in enumerate(spacing) if i != axis)
            if value < max_other:
                value = max_other + 1e-5
            spacing[axis] = float(value)
    return spacing


def resampled_shape(fp: Mapping, spacing: Sequence[float]) -> list[int]:
    """Median (cropped) shape after resampling from the median spacing to ``spacing``."""
    return [
        max(1, int(round(s * m / t))) for s, m, t in zip(_median_shape(fp), _median_spacing(fp), spacing)
    ]


#: channel names (upper case) normalised as 8-bit colour
RGB_CHANNEL_NAMES = ("RGB", "R", "G", "B", "RGB_TO_0_1")


def normalization_scheme(modality: str, intensity: Mapping | None = None) -> dict[str, Any]:
    """Normalisation of one channel.

    * ``CT``: ``{"scheme": "ct", "clip": [p0.5, p99.5], "mean": m, "std": s}`` from the foreground intensities
      (nnU-Net's CTNormalization: clip, then ``(x - m) / s``).
    * ``RGB``, or a colour channel named as in nnU-Net v2 ``dataset.json`` files (``R``, ``G``, ``B``,
      ``rgb_to_0_1``; our converters write ``R``/``G``/``B``): ``{"scheme": "rgb", "clip": [0, 255]}``, scaled to
      [0, 1].
    * anything else (MR, grey, ...): ``{"scheme": "zscore"}`` per image (mean/std computed at run time).
    """
    mod = str(modality).upper()
    if mod == "CT":
        if intensity is None:
            raise ValueError("CT normalisation needs the channel's foreground intensity statistics.")
        return {
            "scheme": "ct",
            "clip": [float(intensity["percentile_00_5"]), float(intensity["percentile_99_5"])],
            "mean": float(intensity["mean"]),
            "std": max(float(intensity["std"]), 1e-8),
        }
    if mod in RGB_CHANNEL_NAMES:
        return {"scheme": "rgb", "clip": [0.0, 255.0], "mean": None, "std": None}
    return {"scheme": "zscore", "clip": None, "mean": None, "std": None}


def normalization_schemes(fp: Mapping) -> list[dict[str, Any]]:
    """:func:`normalization_scheme` for every channel, with the channel index and modality."""
    out = []
    for c, (mod, inten) in enumerate(zip(_modalities(fp), _intensity(fp))):
        out.append({"channel": c, "modality": mod, **normalization_scheme(mod, inten)})
    return out


def bundle_normalization(schemes: Sequence[Mapping]) -> str:
    """The one ``normalization`` name of ``train.json`` closest to the per-channel schemes.

    The bundle has no parametrised CT normalisation, only a fixed window (``"ct"``: clip to [-175, 250] HU, scale
    to [0, 1]). CT channels map to ``"ct"`` when every channel's foreground window [p0.5, p99.5] lies inside that
    window (+-10% of its width), so the fixed clip loses no foreground contrast; otherwise to ``"zscore"``. All-RGB
    -> ``"rgb"``; anything else (MR, mixed) -> ``"zscore"``. ``plans.json`` keeps the exact per-channel numbers.
    """
    kinds = {s["scheme"] for s in schemes}
    if kinds == {"rgb"}:
        return "rgb"
    if kinds == {"ct"}:
        lo, hi = BUNDLE_CT_WINDOW
        tol = CT_WINDOW_TOLERANCE * (hi - lo)
        if all(s["clip"][0] >= lo - tol and s["clip"][1] <= hi + tol for s in schemes):
            return "ct"
    return "zscore"


def network_topology(
    patch_size: Sequence[int],
    spacing: Sequence[float] | None = None,
    base_width: int = BASE_WIDTH,
    max_width: int = MAX_WIDTH,
    min_levels: int = MIN_LEVELS,
    min_bottleneck: int | None = None,
    num_res_blocks: int = 1,
) -> dict[str, Any]:
    """Widths and depth of both UNets for ``patch_size``.

    ``levels = 1 + floor(log2(min(patch) / min_bottleneck))`` (at least ``min_levels``), so the smallest axis is
    ``min_bottleneck`` to ``2 * min_bottleneck - 1`` voxels at the bottleneck (default ``MIN_BOTTLENECK`` per
    dimensionality); ``channels[l] = min(base_width * 2**l, max_width)``. Pooling is isotropic
    (``MedSegDiffV2`` halves every axis at every level), so for anisotropic 3D patches the larger axes end with more
    than 8 voxels at the bottleneck; ``spacing`` is recorded but does not change the pooling (nnU-Net would skip
    pooling the coarse axis -- not supported by the network).
    """
    if min_bottleneck is None:
        min_bottleneck = MIN_BOTTLENECK[len(patch_size)]
    smallest = max(1, int(min(patch_size)))
    levels = max(int(min_levels), 1 + int(math.floor(math.log2(max(smallest / min_bottleneck, 1.0)))))
    channels = [int(min(base_width * 2**level, max_width)) for level in range(levels)]
    divisor = 2 ** (levels - 1)
    return {
        "channels": channels,
        "num_res_blocks": int(num_res_blocks),
        "levels": levels,
        "divisor": divisor,
        "bottleneck": [max(1, int(s) // divisor) for s in patch_size],
        "pooling": "isotropic",
        "spacing": None if spacing is None else [float(s) for s in spacing],
    }


def initial_patch_size(fp: Mapping, spacing: Sequence[float]) -> list[int]:
    """The patch before the memory fit.

    2D: ``min(256, median size)`` per axis (the bundle resizes each 2D image to the patch). 3D (nnU-Net v2): a box
    of ``256**3`` voxels with sides proportional to ``1 / spacing`` (isotropic in mm), clipped to the median
    resampled shape and to ``MAX_PATCH[3]`` per axis.
    """
    dims = int(fp["spatial_dims"])
    median = resampled_shape(fp, spacing)
    if dims == 2:
        return [int(min(PATCH_2D, MAX_PATCH[2], s)) for s in median]
    inv = 1.0 / np.asarray(spacing, dtype=np.float64)
    box = inv * (INITIAL_PATCH_VOXELS_3D / np.prod(inv)) ** (1.0 / 3.0)
    return [int(min(round(b), m, MAX_PATCH[3])) for b, m in zip(box, median)]


def _round_to_divisor(patch: Sequence[int], divisor: int) -> list[int]:
    return [max(divisor, (int(s) // divisor) * divisor) for s in patch]


def _fit_divisor(patch: Sequence[int], spacing: Sequence[float], topo_kwargs: Mapping) -> tuple[list[int], dict]:
    """Round the patch down to the divisor of its topology until both agree."""
    patch = [int(s) for s in patch]
    for _ in range(16):
        topo = network_topology(patch, spacing, **topo_kwargs)
        rounded = _round_to_divisor(patch, topo["divisor"])
        if rounded == patch:
            return patch, topo
        patch = rounded
    return patch, network_topology(patch, spacing, **topo_kwargs)


def _axis_to_shrink(patch: Sequence[int], spacing: Sequence[float], median: Sequence[int], divisor: int) -> int | None:
    """The largest axis in mm that can still shrink by ``divisor``; ties: larger fraction of the median shape,
    then the lower index."""
    candidates = [i for i, s in enumerate(patch) if s - divisor >= divisor]
    if not candidates:
        return None
    return max(candidates, key=lambda i: (round(patch[i] * spacing[i], 6), patch[i] / max(median[i], 1), -i))


def dataset_batch_cap(fp: Mapping, patch_size: Sequence[int], spacing: Sequence[float]) -> int:
    """nnU-Net's rule: one batch covers at most 5% of the dataset's voxels (at least ``MIN_BATCH``), and at most
    ``MAX_BATCH`` (32 in 2D, 8 in 3D). 3D dataset voxels: ``num_cases * prod(median resampled shape)``; 2D:
    ``num_cases * prod(patch)``, since every 2D image is resized to the patch."""
    dims = int(fp["spatial_dims"])
    per_case = np.prod(patch_size if dims == 2 else resampled_shape(fp, spacing), dtype=np.float64)
    voxels = float(fp["num_cases"]) * per_case
    cap = int(round(voxels * DATASET_FRACTION / float(np.prod(patch_size, dtype=np.float64))))
    return int(min(MAX_BATCH[dims], max(MIN_BATCH, cap)))


def patch_and_batch(
    fp: Mapping,
    spacing: Sequence[float],
    gpu_memory_gb: float = 24.0,
    *,
    base_width: int = BASE_WIDTH,
    max_width: int = MAX_WIDTH,
    num_res_blocks: int = 1,
    safety_margin: float = SAFETY_MARGIN,
    amp: bool = False,
    memory_model: Mapping | None = None,
) -> dict[str, Any]:
    """Patch size, batch size and topology that fit ``safety_margin * gpu_memory_gb`` per the memory model.

    1. :func:`initial_patch_size`, rounded down to the divisor of its :func:`network_topology`.
    2. While batch ``MIN_BATCH`` does not fit: shrink the largest physical axis by the current divisor (recomputing
       the topology, which can drop a level). Stops at the smallest patch (``fits`` is then ``False``).
    3. ``batch_size`` = the largest batch that fits, at least ``MIN_BATCH``, capped by :func:`dataset_batch_cap`.
       ``max_batch_memory`` is the largest batch the memory allows (can be 1 when even ``MIN_BATCH`` does not fit;
       :func:`ddp_settings` then accumulates gradients).

    ``amp=False`` (default) budgets with fp32 activations, an upper bound for AMP training on GPUs.
    """
    dims = int(fp["spatial_dims"])
    in_channels = int(fp["num_channels"])
    num_classes = num_classes_from_labels(fp["labels"])
    model = dict(memory_model) if memory_model is not None else load_memory_model()
    budget = float(gpu_memory_gb) * GIB * float(safety_margin)
    topo_kwargs = {"base_width": base_width, "max_width": max_width, "num_res_blocks": num_res_blocks}
    median = resampled_shape(fp, spacing)

    def predict(patch: Sequence[int], topo: Mapping, batch: int):
        return predict_training_memory(dims, in_channels, num_classes, topo["channels"], topo["num_res_blocks"],
                                       patch, batch, amp=amp, model=model)

    patch, topo = _fit_divisor(initial_patch_size(fp, spacing), spacing, topo_kwargs)
    shrink_steps = 0
    while predict(patch, topo, MIN_BATCH).total > budget:
        axis = _axis_to_shrink(patch, spacing, median, topo["divisor"])
        if axis is None:
            break
        patch[axis] -= topo["divisor"]
        patch, topo = _fit_divisor(patch, spacing, topo_kwargs)
        shrink_steps += 1
    cap = dataset_batch_cap(fp, patch, spacing)
    max_batch_memory = 0
    for b in range(1, MAX_BATCH[dims] + 1):
        if predict(patch, topo, b).total <= budget:
            max_batch_memory = b
        else:
            break
    batch = max(MIN_BATCH, min(max_batch_memory, cap))
    estimate = predict(patch, topo, min(batch, max(max_batch_memory, 1)))
    return {
        "patch_size": patch,
        "batch_size": int(batch),
        "max_batch_memory": int(max_batch_memory),
        "batch_cap_dataset": int(cap),
        "topology": topo,
        "fits": bool(max_batch_memory >= MIN_BATCH),
        "shrink_steps": shrink_steps,
        "budget_bytes": budget,
        "estimate": estimate,
        "amp_in_estimate": bool(amp),
    }


def sampler_settings(spatial_dims: int) -> dict[str, Any]:
    """Inference and validation sampling: DPM-Solver++ 20 steps, ensemble 5 (2D) / 3 (3D); validation during
    training: 10 steps, no ensemble."""
    return {"sampler": "dpmpp", "steps": 20, "ensemble": 5 if int(spatial_dims) == 2 else 3,
            "val_sampler": "dpmpp", "val_steps": 10, "val_ensemble": 1}


def ddp_settings(
    global_batch: int,
    gpus: int | None = None,
    max_per_gpu_batch: int | None = None,
    cpu_count: int | None = None,
) -> dict[str, Any]:
    """Data-parallel layout for ``global_batch``.

    * ``world_size``: ``gpus`` if given, else ``torch.cuda.device_count()``; at least 1.
    * ``per_gpu_batch = ceil(global_batch / world_size)``, but not above ``max_per_gpu_batch`` (what the memory
      allows); ``grad_accum`` then makes up the difference (``ceil(global / (per_gpu * world))``), 1 otherwise, so
      the effective global batch stays ~ ``global_batch``.
    * ``num_workers = min(8, cpu_count // world_size)`` data-loader workers per process.
    * ``backend``: ``"nccl"`` with CUDA, else ``"gloo"``.
    * ``sync_bn``: ``False`` -- the network uses GroupNorm, which has no batch statistics to synchronise.
    """
    import torch

    world = int(gpus) if gpus is not None else int(torch.cuda.device_count())
    world = max(1, world)
    global_batch = max(1, int(global_batch))
    per_gpu = int(math.ceil(global_batch / world))
    grad_accum = 1
    if max_per_gpu_batch is not None and per_gpu > int(max_per_gpu_batch):
        per_gpu = max(1, int(max_per_gpu_batch))
        grad_accum = int(math.ceil(global_batch / (per_gpu * world)))
    cpus = int(cpu_count) if cpu_count is not None else int(os.cpu_count() or 1)
    return {
        "world_size": world,
        "per_gpu_batch": per_gpu,
        "grad_accum": grad_accum,
        "effective_global_batch": per_gpu * world * grad_accum,
        "backend": "nccl" if torch.cuda.is_available() else "gloo",
        "num_workers": int(min(8, cpus // world)),
        "sync_bn": False,
        "sync_bn_reason": "GroupNorm only (no BatchNorm statistics to synchronise)",
    }


def dataset_cache(
    fp: Mapping, patch_size: Sequence[int], spacing: Sequence[float], world_size: int = 1
) -> dict[str, Any]:
    """Where the bundle keeps the deterministic pre-processing (``dataset_cache``; see
    :func:`medsegdiff_bundle.data.build_dataset`): ``"memory"`` when every process's copy of all cases fits
    ``MEMORY_CACHE_GB`` (:mod:`medsegdiff_bundle.data.cache`), else ``"disk"`` (nnU-Net likewise trains from
    pre-processed data on disk).

    A cached case is float32 image channels plus the label at the 2D ``patch_size`` (the bundle resizes every image to
    it) or the 3D median resampled shape; each data-parallel process holds its own copy.
    """
    dims = int(fp["spatial_dims"])
    shape = patch_size if dims == 2 else resampled_shape(fp, spacing)
    total = int(fp["num_cases"]) * cached_bytes_per_case(shape, int(fp["num_channels"])) * max(1, int(world_size))
    return {
        "dataset_cache": "memory" if total <= MEMORY_CACHE_GB * GIB else "disk",
        "cached_gb": round(total / GIB, 4),
        "memory_limit_gb": MEMORY_CACHE_GB,
    }


def training_schedule(num_cases: int, global_batch: int, num_samples: int = 1) -> dict[str, Any]:
    """Epochs for ~``TARGET_ITERATIONS`` optimiser steps on the training fold (80% of the cases), clipped to
    [50, 1000] epochs; validation ~``VALIDATIONS_PER_RUN`` times per run; AdamW learning rate 1e-4 (the bundle's)."""
    train_cases = max(1, int(round(int(num_cases) * (1 - VALIDATION_FRACTION))))
    steps_per_epoch = max(1, math.ceil(train_cases * int(num_samples) / max(1, int(global_batch))))
    lo, hi = EPOCH_RANGE
    epochs = int(min(hi, max(lo, round(TARGET_ITERATIONS / steps_per_epoch))))
    return {
        "max_epochs": epochs,
        "val_interval": max(1, epochs // VALIDATIONS_PER_RUN),
        "learning_rate": LEARNING_RATE,
        "num_samples": int(num_samples),
        "steps_per_epoch": steps_per_epoch,
    }


# ----------------------------------------------------------------------------------------------------------- plan


def plan_dataset(
    fp: Mapping,
    gpu_memory_gb: float = 24.0,
    gpus: int | None = None,
    *,
    amp: bool = True,
    base_width: int = BASE_WIDTH,
    max_width: int = MAX_WIDTH,
    safety_margin: float = SAFETY_MARGIN,
    cpu_count: int | None = None,
) -> dict[str, Any]:
    """The full plan for a fingerprint (writes nothing; see :func:`save_plans`). Deterministic: the same
    fingerprint and arguments (and the same ``torch.cuda.device_count()`` / CPU count when ``gpus`` /
    ``cpu_count`` are not given) give the same plan.

    Args:
        fp: dataset fingerprint (``medsegdiff_bundle.planning.fingerprint``).
        gpu_memory_gb: memory of one GPU.
        gpus: GPUs to train on (default: the visible CUDA devices, at least 1).
        amp: train with mixed precision (the memory budget is still computed in fp32).
        base_width, max_width: first-level and maximum UNet widths.
        safety_margin: fraction of ``gpu_memory_gb`` the predicted peak may use.
        cpu_count: CPUs for data-loader workers (default: ``os.cpu_count()``).
    """
    dims = int(fp["spatial_dims"])
    configuration = choose_configuration(fp)
    spacing = target_spacing(fp)
    aniso = anisotropy(fp) if dims == 3 else {"anisotropic": False}
    schemes = normalization_schemes(fp)
    num_classes = num_classes_from_labels(fp["labels"])
    pb = patch_and_batch(fp, spacing, gpu_memory_gb, base_width=base_width, max_width=max_width,
                         safety_margin=safety_margin, amp=False)
    topo = pb["topology"]
    max_per_gpu = pb["max_batch_memory"] if pb["max_batch_memory"] >= 1 else 1
    ddp = ddp_settings(pb["batch_size"], gpus, max_per_gpu_batch=max_per_gpu, cpu_count=cpu_count)
    sampler = sampler_settings(dims)
    schedule = training_schedule(int(fp["num_cases"]), pb["batch_size"], 1)
    per_gpu_estimate = predict_training_memory(dims, int(fp["num_channels"]), num_classes, topo["channels"],
                                               topo["num_res_blocks"], pb["patch_size"], ddp["per_gpu_batch"])
    notes = []
    if aniso.get("anisotropic"):
        value, source = lowres_axis_spacing(fp, aniso["axis"])
        notes.append(f"anisotropic axis {aniso['axis']}: target spacing {spacing[aniso['axis']]:.4g} "
                     f"(10th percentile from {source}) instead of the median {_median_spacing(fp)[aniso['axis']]:.4g}")
    bundle_norm = bundle_normalization(schemes)
    if any(s["scheme"] == "ct" for s in schemes) and bundle_norm != "ct":
        notes.append("CT clip window does not match the bundle's fixed 'ct' window [-175, 250]; the bundle uses "
                     "'zscore' (per image); the exact per-channel clip/mean/std are in 'normalization'")
    if not pb["fits"]:
        notes.append(f"even batch {MIN_BATCH} at the smallest patch exceeds the budget; per-GPU batch "
                     f"{ddp['per_gpu_batch']} with gradient accumulation {ddp['grad_accum']}")
    if ddp["grad_accum"] > 1:
        notes.append("grad_accum > 1 is not implemented by the bundle's DiffusionTrainIteration; bundle_overrides "
                     "uses the per-GPU batch")
    labels = [int(v) for v in fp["labels"]]
    if labels and labels != list(range(len(labels))):
        notes.append(f"labels {labels} are not 0..K-1; num_classes = max + 1 = {num_classes}")
    if dims == 2:
        notes.append("2D: the bundle resizes every image to patch_size; target_spacing is informational")
    return {
        "plans_version": PLANS_VERSION,
        "configuration": configuration,
        "spatial_dims": dims,
        "in_channels": int(fp["num_channels"]),
        "num_classes": num_classes,
        "label_threshold": fp.get("label_threshold"),
        "target_spacing": [float(s) for s in spacing],
        "patch_size": [int(s) for s in pb["patch_size"]],
        "batch_size": int(pb["batch_size"]),
        "normalization": schemes,
        "bundle_normalization": bundle_norm,
        "network": {
            "channels": topo["channels"],
            "num_res_blocks": topo["num_res_blocks"],
            "levels": topo["levels"],
            "divisor": topo["divisor"],
            "bottleneck": topo["bottleneck"],
            "pooling": topo["pooling"],
        },
        "sampler": sampler,
        "ddp": ddp,
        "data": dataset_cache(fp, pb["patch_size"], spacing, ddp["world_size"]),
        "training": {**schedule, "amp": bool(amp)},
        "memory": {
            "predicted_peak_gb": round(per_gpu_estimate.total / GIB, 4),
            "predicted_peak_gb_at_plan_batch": round(pb["estimate"].total / GIB, 4),
            "budget_gb": round(pb["budget_bytes"] / GIB, 4),
            "gpu_memory_gb": float(gpu_memory_gb),
            "safety_margin": float(safety_margin),
            "fits": pb["fits"],
            "max_batch_memory": pb["max_batch_memory"],
            "batch_cap_dataset": pb["batch_cap_dataset"],
            "precision_assumed": "fp32 activations (upper bound for AMP on GPU)",
            "breakdown_bytes": per_gpu_estimate.as_dict(),
            "model": "medsegdiff_bundle/planning/memory_model.json",
        },
        "fingerprint_summary": {
            "num_cases": int(fp["num_cases"]),
            "spatial_dims": dims,
            "num_channels": int(fp["num_channels"]),
            "modality": _modalities(fp),
            "labels": labels,
            "class_fractions": dict(fp.get("class_fractions") or {}),
            "median_spacing": _median_spacing(fp),
            "median_shape": [float(s) for s in fp["shape"]["median"]],
            "median_shape_after_crop": _median_shape(fp),
            "median_resampled_shape": resampled_shape(fp, spacing),
            "anisotropy": aniso,
        },
        "planner": {"gpu_memory_gb": float(gpu_memory_gb), "gpus": gpus, "amp": bool(amp),
                    "base_width": int(base_width), "max_width": int(max_width)},
        "notes": notes,
    }


def bundle_overrides(plans: Mapping) -> dict[str, Any]:
    """Flat ``train.json`` overrides for a plan (``batch_size`` is per process, as the bundle's DataLoader uses it)."""
    dims = int(plans["spatial_dims"])
    return {
        "spatial_dims": dims,
        "in_channels": int(plans["in_channels"]),
        "num_classes": int(plans["num_classes"]),
        "patch_size": list(plans["patch_size"]),
        "target_spacing": list(plans["target_spacing"]) if dims == 3 else None,
        "normalization": plans["bundle_normalization"],
        "label_threshold": plans.get("label_threshold"),
        "channels": list(plans["network"]["channels"]),
        "num_res_blocks": int(plans["network"]["num_res_blocks"]),
        "batch_size": int(plans["ddp"]["per_gpu_batch"]),
        "grad_accum": int(plans["ddp"]["grad_accum"]),
        "num_workers": int(plans["ddp"]["num_workers"]),
        "learning_rate": float(plans["training"]["learning_rate"]),
        "max_epochs": int(plans["training"]["max_epochs"]),
        "val_interval": int(plans["training"]["val_interval"]),
        "val_sampler": plans["sampler"]["val_sampler"],
        "val_steps": int(plans["sampler"]["val_steps"]),
        "val_ensemble": int(plans["sampler"]["val_ensemble"]),
        "amp": bool(plans["training"]["amp"]),
        "num_samples": int(plans["training"]["num_samples"]),
        # plans written before the data section keep the bundle's default
        **({"dataset_cache": plans["data"]["dataset_cache"]} if "data" in plans else {}),
    }


def save_plans(plans: Mapping, output_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``plans.json`` and ``bundle_overrides.json`` into ``output_dir``; returns both paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plans_path, overrides_path = out / PLANS_FILE, out / OVERRIDES_FILE
    for path, content in ((plans_path, plans), (overrides_path, bundle_overrides(plans))):
        write_json_atomic(path, content)
    return plans_path, overrides_path


def load_plans(path: str | os.PathLike) -> dict[str, Any]:
    """Read ``plans.json`` (a file or the folder holding it) and check its version."""
    path = Path(path)
    if path.is_dir():
        path = path / PLANS_FILE
    plans = json.loads(path.read_text(encoding="utf-8"))
    if plans.get("plans_version") != PLANS_VERSION:
        raise ValueError(f"{path}: plans_version {plans.get('plans_version')!r}, expected {PLANS_VERSION}.")
    return plans
