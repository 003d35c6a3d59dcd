"""nnU-Net-style dataset fingerprint: what a plan (spacing, patch size, normalisation) is derived from.

:func:`extract_fingerprint` loads every case of a datalist exactly as training does (MONAI ``LoadImage`` +
``EnsureChannelFirst``, plus ``Orientation("RAS")`` for 3D) and records per case its spacing, shape, shape after
cropping to the image's nonzero region, label classes and their voxel fractions, and a seeded sample of foreground
intensities; the dataset summary pools these (median spacing/shape, per-channel foreground intensity percentiles,
mean class fractions) and names each channel's modality. :func:`save_fingerprint` writes ``fingerprint.json`` (the
summary plus a compact per-case list) and ``fingerprint_cases.csv`` (one flat row per case).

Reused from MONAI: loading (``LoadImage``/``EnsureChannelFirst``/``Orientation``), ``affine_to_spacing``, the
nonzero crop (``generate_spatial_bounding_box``, CropForeground's core) and Auto3DSeg's ``SampleOperations`` (hence
``percentile_00_5``). ``auto3dseg.DataAnalyzer`` is not: it averages per-case percentiles instead of pooling foreground
samples as nnU-Net does, crops ``x > 0`` per channel (wrong for CT/z-scored MR), logs and skips bad cases, and has no
label_threshold/RGB masks, dataset.json label check or modality inference; the small driver here adds those.

Axis order: arrays are kept in the order MONAI loads them, since training uses that order. 3D volumes are in RAS
axis order after ``Orientation`` (axis 0 runs towards Right, 1 Anterior, 2 Superior). 2D images read by MONAI's PIL reader
are ``(W, H)`` (width first, the transpose of ``numpy.asarray(PIL.Image)``); their spacing is 1.0 per axis unless
the file's affine says otherwise.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.auto3dseg.operations import SampleOperations
from monai.data.utils import affine_to_spacing
from monai.transforms import EnsureChannelFirst, LoadImage, Orientation
from monai.transforms.utils import generate_spatial_bounding_box
from tqdm.auto import tqdm

from ..data.datalist import case_name, load_datalist, validate_cases
from ..data.transforms import RAS_AXIS_LABELS
from ..utils import atomic_open, read_json_object, write_json_atomic

__all__ = ["FINGERPRINT_VERSION", "extract_fingerprint", "save_fingerprint", "load_fingerprint"]

logger = logging.getLogger(__name__)

FINGERPRINT_VERSION = 1
FINGERPRINT_FILE = "fingerprint.json"
CASES_FILE = "fingerprint_cases.csv"
_INTENSITY_KEYS = ("mean", "std", "median", "min", "max", "percentile_00_5", "percentile_99_5")
_REQUIRED_KEYS = (
    "version", "num_cases", "spatial_dims", "num_channels", "spacing", "shape", "shape_after_crop",
    "foreground_intensity", "labels", "class_fractions", "modality", "modality_source",
)  # fmt: skip
_CT_PERCENTILE_00_5 = -500.0  # HU: air is -1000, so any CT with air in the field of view is far below this


def _nonzero(x):
    return x != 0


# ---------------------------------------------------------------------------------------------------------- per case


class _Loader:
    """MONAI loading as in ``build_preprocessing``, keeping the file's own dtype (float32 is applied later there)."""

    def __init__(self) -> None:
        self.load = LoadImage(image_only=True, dtype=None)
        self.channel_first = EnsureChannelFirst()
        self.orient = Orientation(axcodes="RAS", labels=RAS_AXIS_LABELS)  # as training's Orientationd

    def __call__(self, paths) -> torch.Tensor:
        img = self.channel_first(self.load(paths))
        if img.ndim == 4:  # 3D: channel + 3 spatial axes
            img = self.orient(img)
        return img


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


_local = threading.local()


def _loader() -> _Loader:
    if not hasattr(_local, "loader"):  # one per thread: MONAI's readers are not documented as thread-safe
        _local.loader = _Loader()
    return _local.loader


def _case_names(items: list[dict]) -> list[str]:
    """``case_name`` of each item; where two coincide (BraTS: every case is ``Flair...``), prefixed by the folder."""
    names = [case_name(item) for item in items]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        for i, item in enumerate(items):
            if names[i] in dup:
                first = item["image"][0] if isinstance(item["image"], (list, tuple)) else item["image"]
                names[i] = f"{Path(first).parent.name}/{names[i]}"
    counts = {n: names.count(n) for n in names}
    seen: dict[str, int] = {}
    for i, n in enumerate(list(names)):  # still equal (same folder name): number them
        seen[n] = seen.get(n, 0) + 1
        if counts[n] > 1:
            names[i] = f"{n}#{seen[n]}"
    return names


def _process_case(
    index: int,
    name: str,
    item: dict,
    label_threshold: float | None,
    declared_labels: set[int] | None,
    max_samples: int,
    seed: int,
) -> dict:
    """Everything the fingerprint needs from one case; raises ``ValueError`` for a bad label."""
    loader = _loader()
    image = loader(item["image"])
    spatial_dims = image.ndim - 1
    affine = getattr(image, "affine", None)
    spacing = (
        [float(s) for s in _to_numpy(affine_to_spacing(affine, r=spatial_dims))]
        if affine is not None and affine.shape[0] > spatial_dims
        else [1.0] * spatial_dims
    )
    dtype = str(image.dtype).replace("torch.", "")
    img = _to_numpy(image)
    shape = [int(s) for s in img.shape[1:]]

    start, end = generate_spatial_bounding_box(img, select_fn=_nonzero)
    crop = [int(e) - int(s) for s, e in zip(start, end)]
    if not any(crop):  # an all-zero image: nothing to crop to, keep its shape rather than report 0
        logger.warning("case %s: image is zero everywhere", name)
        crop = list(shape)

    record: dict[str, Any] = {
        "case": name,
        "image": item["image"],
        "label": item.get("label"),
        "spatial_dims": spatial_dims,
        "num_channels": int(img.shape[0]),
        "dtype": dtype,
        "spacing": spacing,
        "shape": shape,
        "shape_after_crop": crop,
    }

    fg_mask = None
    if item.get("label") is not None:
        lab = _to_numpy(loader(item["label"]))
        if lab.shape[0] > 1:  # RGB-encoded masks (e.g. Kvasir's JPEGs): the first channel, as PrepareLabeld does
            lab = lab[:1]
        if tuple(lab.shape[1:]) != tuple(shape):
            raise ValueError(f"label spatial shape {list(lab.shape[1:])} differs from image shape {shape}")
        lab = lab[0]
        if label_threshold is not None:
            lab = (lab > label_threshold).astype(np.uint8)
        values, counts = np.unique(lab, return_counts=True)
        values_f = values.astype(np.float64)
        if not np.all(np.isfinite(values_f)) or not np.array_equal(values_f, np.round(values_f)):
            odd = [float(v) for v in values_f if not (math.isfinite(v) and v == round(v))][:5]
            raise ValueError(f"label has non-integer values (e.g. {odd}); set label_threshold for 0..255 masks")
        labels = [int(v) for v in values_f]
        if declared_labels is not None:
            unknown = sorted(set(labels) - declared_labels)
            if unknown:
                raise ValueError(
                    f"label values {unknown} are not among the labels {sorted(declared_labels)} "
                    "declared in dataset.json"
                )
        total = float(lab.size)
        record["labels"] = labels
        record["class_fractions"] = {v: float(c) / total for v, c in zip(labels, counts)}
        fg_mask = lab > 0
        record["foreground_voxels"] = int(fg_mask.sum())
    else:
        record["labels"], record["class_fractions"], record["foreground_voxels"] = None, None, None

    # seeded per case, so the sample does not depend on which worker ran the case or in which order
    rng = np.random.default_rng([int(seed), int(index)])
    flat = img.reshape(img.shape[0], -1)
    if fg_mask is not None and fg_mask.any():
        idx = np.flatnonzero(fg_mask.reshape(-1))
        if idx.size > max_samples:
            idx = np.sort(rng.choice(idx, size=max_samples, replace=False))
        record["samples_from"] = "foreground"
    else:  # no foreground: sample the whole image
        n = flat.shape[1]
        idx = np.sort(rng.choice(n, size=max_samples, replace=False)) if n > max_samples else np.arange(n)
        record["samples_from"] = "image"
    record["samples"] = flat[:, idx].astype(np.float64)
    # for modality inference: the 0.5 percentile of the whole image, per channel (CT air is ~ -1000 HU)
    whole = flat if flat.shape[1] <= max_samples else flat[:, rng.choice(flat.shape[1], max_samples, replace=False)]
    record["image_percentile_00_5"] = [float(v) for v in np.percentile(whole.astype(np.float64), 0.5, axis=1)]
    return record


def _safe_process(args) -> tuple[dict | None, str | None]:
    index, name, *rest = args
    try:
        return _process_case(index, name, *rest), None
    except ValueError as e:  # report every bad case at once, naming it
        return None, str(e)
    except Exception as e:  # e.g. a file whose header reads but whose voxel data is corrupt
        return None, f"{type(e).__name__}: {e}"


# -------------------------------------------------------------------------------------------------- dataset.json


def _find_dataset_json(datalist: Path, dataroot: Path | None) -> Path | None:
    for folder in (datalist.parent, dataroot):
        if folder is not None and (folder / "dataset.json").is_file():
            return folder / "dataset.json"
    return None


def _ordered_by_index(mapping: dict) -> list[str]:
    try:
        keys = sorted(mapping, key=int)
    except (TypeError, ValueError) as e:
        raise ValueError(f"channel keys must be '0', '1', ...; got {sorted(mapping)}") from e
    return [str(mapping[k]) for k in keys]


def _declared_labels(labels: Any) -> set[int] | None:
    """Label values from nnU-Net (``{"background": 0, "tumor": [1, 2]}``) or MSD (``{"0": "background"}``) style."""
    if not isinstance(labels, dict) or not labels:
        return None
    if all(str(k).lstrip("-").isdigit() for k in labels):  # MSD: value -> name
        return {int(k) for k in labels}
    out: set[int] = set()
    for v in labels.values():  # nnU-Net: name -> value (or a region: list of values)
        for x in v if isinstance(v, (list, tuple)) else [v]:
            out.add(int(x))
    return out


def _read_dataset_json(path: Path | None) -> tuple[list[str] | None, set[int] | None]:
    if path is None:
        return None, None
    meta = read_json_object(path, "dataset.json")
    channels = meta.get("channel_names") or meta.get("modality")
    try:
        modality = _ordered_by_index(channels) if isinstance(channels, dict) and channels else None
        declared = _declared_labels(meta.get("labels"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e
    return modality, declared


# -------------------------------------------------------------------------------------------------- aggregation


def _names(records: list[dict], limit: int = 5) -> str:
    names = [r["case"] for r in records]
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _axis_stats(values: list[list[float]], as_int: bool = False) -> dict[str, list]:
    arr = np.asarray(values, dtype=np.float64)

    def conv(a) -> list:
        return [int(v) if as_int and float(v).is_integer() else float(v) for v in a]

    return {"median": conv(np.median(arr, axis=0)), "min": conv(arr.min(axis=0)), "max": conv(arr.max(axis=0))}


def _intensity_stats(samples: np.ndarray) -> dict[str, float]:
    if samples.size == 0:
        return {k: float("nan") for k in _INTENSITY_KEYS} | {"num_samples": 0}
    ops = SampleOperations().evaluate(samples)  # MONAI Auto3DSeg's sample statistics
    ops["std"] = ops.pop("stdev")
    return {k: float(ops[k]) for k in _INTENSITY_KEYS} | {"num_samples": int(samples.size)}


def _infer_modality(spatial_dims: int, num_channels: int, dtypes: list[str], p005: list[float]) -> list[str]:
    if spatial_dims == 2 and num_channels == 3 and all(d == "uint8" for d in dtypes):
        return ["RGB"] * 3
    default = "MR" if spatial_dims == 3 else "grey"
    return ["CT" if p < _CT_PERCENTILE_00_5 else default for p in p005]


def extract_fingerprint(
    datalist: str | Path,
    dataroot: str | Path | None = None,
    data_list_key: str = "training",
    label_threshold: float | None = None,
    modality: Sequence[str] | None = None,
    num_workers: int = 2,
    max_foreground_samples: int = 10000,
    seed: int = 0,
) -> dict:
    """Fingerprint the cases of a datalist (see the module docstring).

    Args:
        datalist: MSD/Decathlon-style JSON datalist.
        dataroot: folder relative paths are resolved against (default: the datalist's folder); a ``dataset.json``
            there is read when there is none next to the datalist.
        data_list_key: which list of the datalist to read.
        label_threshold: binarise labels as ``label > label_threshold`` first (e.g. 127 for 0/255 JPEG masks).
        modality: one name per channel (e.g. ``["CT"]``); otherwise taken from ``dataset.json`` (nnU-Net
            ``channel_names`` or MSD ``modality``) or inferred: ``RGB`` for 2D 3-channel uint8, else per channel
            ``CT`` when the median over cases of the whole image's 0.5 percentile is below -500 (air in HU), else
            ``MR`` (3D) / ``grey`` (2D).
        num_workers: threads loading cases (file reads and numpy work release the GIL).
        max_foreground_samples: per case and channel, at most this many intensities are sampled where label > 0
            (from the whole image when a case has no foreground).
        seed: seed of that sampling; case ``i`` uses ``[seed, i]``, so results do not depend on ``num_workers``.

    Returns:
        a JSON-serialisable dict; per-case records are under ``"cases"``.

    Raises:
        ValueError: missing/unreadable files or image/label size mismatches (from ``validate_cases``, naming every
            bad case), labels with non-integer values or values not declared in dataset.json (naming the cases),
            a datalist mixing 2D and 3D (naming the first case that differs), inconsistent channel counts, or a
            ``modality`` whose length is not the channel count.
    """
    if max_foreground_samples < 1:
        raise ValueError(f"max_foreground_samples must be >= 1, got {max_foreground_samples}.")
    datalist_path = Path(datalist).expanduser().resolve()
    root = Path(dataroot).expanduser().resolve() if dataroot is not None else None
    items = load_datalist(datalist_path, data_list_key, root)
    if not items:
        raise ValueError(f"{data_list_key!r} in {datalist_path} lists no cases.")
    validate_cases(items, ("image", "label"), on_error="raise", num_workers=num_workers)

    dataset_json = _find_dataset_json(datalist_path, root)
    json_modality, declared = _read_dataset_json(dataset_json)

    names = _case_names(items)
    jobs = [
        (i, name, item, label_threshold, declared, int(max_foreground_samples), seed)
        for i, (name, item) in enumerate(zip(names, items))
    ]
    with ThreadPoolExecutor(max_workers=max(1, int(num_workers))) as pool:
        results = list(tqdm(pool.map(_safe_process, jobs), total=len(jobs), desc="fingerprint", unit="case"))

    bad = [(name, problem) for name, (_, problem) in zip(names, results) if problem is not None]
    if bad:
        lines = "\n".join(f"  {name}: {problem}" for name, problem in bad)
        raise ValueError(f"{len(bad)} of {len(items)} cases cannot be fingerprinted:\n{lines}")
    records = [r for r, _ in results]

    dims = records[0]["spatial_dims"]
    for r in records[1:]:
        if r["spatial_dims"] != dims:
            raise ValueError(
                f"mixed dimensionality: case {r['case']} is {r['spatial_dims']}D but case {records[0]['case']} is "
                f"{dims}D; fingerprint 2D and 3D data separately."
            )
    by_channels: dict[int, list[dict]] = {}
    for r in records:
        by_channels.setdefault(r["num_channels"], []).append(r)
    if len(by_channels) > 1:
        parts = "; ".join(f"{n} channel(s): {_names(rs)}" for n, rs in sorted(by_channels.items()))
        raise ValueError(f"cases have different numbers of channels: {parts}.")
    num_channels = records[0]["num_channels"]

    samples = np.concatenate([r["samples"] for r in records], axis=1)
    intensity = [_intensity_stats(samples[c]) for c in range(num_channels)]
    dtypes = sorted({r["dtype"] for r in records})

    if modality is not None:
        modality_list, source = [str(m) for m in modality], "argument"
    elif json_modality is not None:
        modality_list, source = json_modality, "dataset.json"
    else:
        p005 = [float(np.median([r["image_percentile_00_5"][c] for r in records])) for c in range(num_channels)]
        modality_list, source = _infer_modality(dims, num_channels, dtypes, p005), "inferred"
    if len(modality_list) != num_channels:
        where = dataset_json if source == "dataset.json" else "the modality argument"
        raise ValueError(
            f"{where} names {len(modality_list)} channel(s) {modality_list} but the images have {num_channels}."
        )

    labelled = [r for r in records if r["labels"] is not None]
    labels = sorted({v for r in labelled for v in r["labels"]})
    if labels and len(labels) > 20 and max(labels) >= 250 and label_threshold is None:
        logger.warning(
            "labels have %d distinct values up to %d: 0/255 masks? set label_threshold", len(labels), max(labels)
        )
    class_fractions = {
        str(v): float(np.mean([r["class_fractions"].get(v, 0.0) for r in labelled])) for v in labels
    }

    cases = [
        {
            "case": r["case"],
            "image": r["image"],
            "label": r["label"],
            "dtype": r["dtype"],
            "spacing": r["spacing"],
            "shape": r["shape"],
            "shape_after_crop": r["shape_after_crop"],
            "labels": r["labels"],
            "class_fractions": None if r["labels"] is None else {str(k): v for k, v in r["class_fractions"].items()},
            "foreground_voxels": r["foreground_voxels"],
            "samples_from": r["samples_from"],
            "foreground_mean": [float(m) for m in r["samples"].mean(axis=1)],
        }
        for r in records
    ]
    return {
        "version": FINGERPRINT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "datalist": str(datalist_path),
        "dataroot": None if root is None else str(root),
        "data_list_key": data_list_key,
        "dataset_json": None if dataset_json is None else str(dataset_json),
        "label_threshold": label_threshold,
        "max_foreground_samples": int(max_foreground_samples),
        "seed": int(seed),
        "num_cases": len(records),
        "spatial_dims": dims,
        "axis_order": "RAS" if dims == 3 else "WH",
        "num_channels": num_channels,
        "dtypes": dtypes,
        "modality": modality_list,
        "modality_source": source,
        "spacing": _axis_stats([r["spacing"] for r in records]),
        "shape": _axis_stats([r["shape"] for r in records], as_int=True),
        "shape_after_crop": _axis_stats([r["shape_after_crop"] for r in records], as_int=True),
        "foreground_intensity": intensity,
        "labels": labels,
        "class_fractions": class_fractions,
        "cases": cases,
    }


# ------------------------------------------------------------------------------------------------------------ I/O


def _cases_table(fp: dict) -> pd.DataFrame:
    rows = []
    labels = fp.get("labels", [])
    for c in fp.get("cases", []):
        row: dict[str, Any] = {"case": c["case"], "dtype": c["dtype"]}
        for key in ("spacing", "shape", "shape_after_crop"):
            for i, v in enumerate(c[key]):
                row[f"{key}_{i}"] = v
        row["foreground_voxels"] = c.get("foreground_voxels")
        for v in labels:
            row[f"fraction_{v}"] = None if c["class_fractions"] is None else c["class_fractions"].get(str(v), 0.0)
        for i, m in enumerate(c["foreground_mean"]):
            row[f"foreground_mean_{i}"] = m
        row["samples_from"] = c["samples_from"]
        row["image"] = json.dumps(c["image"]) if isinstance(c["image"], list) else c["image"]
        row["label"] = c["label"]
        rows.append(row)
    return pd.DataFrame(rows)


def save_fingerprint(fp: dict, output_dir: str | Path) -> Path:
    """Write ``fingerprint.json`` and ``fingerprint_cases.csv`` into ``output_dir`` (each atomically: a reader
    never sees a half-written file). Returns the JSON's path."""
    out = Path(output_dir)
    table = _cases_table(fp)
    with atomic_open(out / CASES_FILE, newline="") as f:
        table.to_csv(f, index=False)
    # allow_nan: a channel without samples has NaN statistics, which Python's json reads back
    write_json_atomic(out / FINGERPRINT_FILE, fp)
    return out / FINGERPRINT_FILE


def load_fingerprint(path: str | Path) -> dict:
    """Read a fingerprint written by :func:`save_fingerprint` (``path``: the JSON file or its folder).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not valid JSON, another version, or required keys missing.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / FINGERPRINT_FILE
    fp = read_json_object(p, "fingerprint file")
    if fp.get("version") != FINGERPRINT_VERSION:
        found = fp.get("version")
        raise ValueError(f"{p}: expected a fingerprint of version {FINGERPRINT_VERSION}, found {found!r}.")
    missing = [k for k in _REQUIRED_KEYS if k not in fp]
    if missing:
        raise ValueError(f"{p}: fingerprint lacks keys {missing}.")
    return fp
