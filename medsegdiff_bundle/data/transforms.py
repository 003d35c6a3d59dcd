"""MONAI transform pipelines for training, validation, inference and evaluation, in 2D and 3D.

The bundle configs call these builders with values from the plan (patch size, spacing, normalisation), so
the JSON stays wiring and the choices live here, testable. Custom transforms are the few MONAI does not have:
label clean-up with case-naming errors, splitting the inferer's uncertainty channel, and overlay pictures.

2D images (PNG/JPG/BMP, RGB or grey) are resized to ``patch_size`` as in the paper (256² there) and inverted back
to their own size after inference. 3D volumes (NIfTI, NRRD/MHA, DICOM series) are reoriented to RAS, optionally
resampled to ``target_spacing``, trained on random patches and inferred with a sliding window.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    AsDiscreted,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    Invertd,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientation,
    Orientationd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resized,
    SaveImaged,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from ..evaluation.visualize import save_overlay
from .datalist import output_name

__all__ = [
    "NORMALIZATIONS",
    "RAS_AXIS_LABELS",
    "PrepareLabeld",
    "SplitTrailingChannelsd",
    "SplitUncertaintyd",
    "MarkSingleChannelMapd",
    "SaveOverlayd",
    "normalization_transforms",
    "build_preprocessing",
    "build_postprocessing",
]

NORMALIZATIONS = ("rgb", "zscore", "ct", "none")
# the axis labels MONAI's Orientation has always read "RAS" with; named explicitly since MONAI deprecates that default
# (a FutureWarning for every 3D pipeline), so that plans, checkpoints and overlays keep the orientation they had
RAS_AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def _source(data: Mapping, key: str) -> str:
    item = data.get(key)
    meta = getattr(item, "meta", None) or data.get(f"{key}_meta_dict", {}) or {}
    name = meta.get("filename_or_obj", "<unknown file>")
    return str(name[0] if isinstance(name, (list, tuple)) else name)


class PrepareLabeld(MapTransform):
    """Make a loaded label a clean one-channel class-index map, or fail naming the file.

    * several channels (RGB-encoded masks such as Kvasir's JPEGs) -> the first channel;
    * ``threshold``: ``label > threshold`` -> 1 (binary masks stored as 0/255);
    * ``mapping``: stored value -> class index (e.g. BraTS ``{4: 3}``, REFUGE2 ``{255: 0, 128: 1, 0: 2}``);
    * values must be integers in ``[0, num_classes)``;
    * the label's spatial size must equal the image's.

    Args:
        keys: label key(s).
        num_classes: classes including background.
        threshold: binarisation threshold, or ``None``.
        image_key: image key for the size check (``None`` skips it).
        mapping: stored label value -> class index, applied to all values at once (so swaps are safe).
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_classes: int,
        threshold: float | None = None,
        image_key: str | None = "image",
        mapping: Mapping[Any, int] | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.num_classes = num_classes
        self.threshold = threshold
        self.image_key = image_key
        self.mapping = {float(k): int(v) for k, v in (mapping or {}).items()}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            if label.shape[0] > 1:
                label = label[:1]
            if self.threshold is not None:
                label = (label > self.threshold).to(torch.uint8) if isinstance(label, torch.Tensor) else (label > self.threshold).astype(np.uint8)
            if self.mapping:
                source = torch.as_tensor(label).float()
                mapped = source.clone()
                for stored, target in self.mapping.items():
                    mapped[source == stored] = target
                label = mapped
            values = torch.as_tensor(label).float()
            if not torch.equal(values, values.round()):
                raise ValueError(
                    f"label {_source(d, key)} has non-integer values; set label_threshold for masks stored as 0..255."
                )
            lo, hi = int(values.min()), int(values.max())
            if lo < 0 or hi >= self.num_classes:
                hint = " (binary mask stored as 0/255? set label_threshold=127)" if hi == 255 else ""
                raise ValueError(
                    f"label {_source(d, key)} has values in [{lo}, {hi}] but num_classes={self.num_classes}{hint}."
                )
            if self.image_key is not None and self.image_key in d and d[self.image_key].shape[1:] != label.shape[1:]:
                raise ValueError(
                    f"image {_source(d, self.image_key)} has spatial size {tuple(d[self.image_key].shape[1:])} but label "
                    f"{_source(d, key)} has {tuple(label.shape[1:])}."
                )
            d[key] = label
        return d


class SplitTrailingChannelsd(MapTransform):
    """Move the last ``num_channels`` channels of ``keys`` to ``output_key`` (channel-first, unbatched).

    ``DiffusionSegInferer`` appends optional outputs after the class probabilities (see its ``return_anchor`` and
    ``return_uncertainty``); post-processing peels them off from the end, last one first.
    """

    def __init__(self, keys: KeysCollection, output_key: str, num_channels: int = 1) -> None:
        super().__init__(keys)
        if num_channels < 1:
            raise ValueError(f"num_channels must be >= 1, got {num_channels}.")
        self.output_key = output_key
        self.num_channels = int(num_channels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        n = self.num_channels
        for key in self.key_iterator(d):
            pred = d[key]
            if pred.shape[0] <= n:
                raise ValueError(
                    f"{key} has {pred.shape[0]} channels; cannot split off the last {n} as {self.output_key!r}."
                )
            d[self.output_key] = pred[-n:].clone()
            d[key] = pred[:-n]
        return d


class SplitUncertaintyd(SplitTrailingChannelsd):
    """Move the last channel of ``keys`` (the inferer's uncertainty, see ``DiffusionSegInferer``) to its own key."""

    def __init__(self, keys: KeysCollection, uncertainty_key: str = "uncertainty") -> None:
        super().__init__(keys, uncertainty_key, 1)


class MarkSingleChannelMapd(MapTransform):
    """Mark one-channel outputs as channel-less maps so writers save ``(H, W[, D])`` files.

    A prediction inherits the input's metadata; for a 4D channel-last input (e.g. MSD's multi-modal NIfTIs) the
    writer would otherwise treat the output's channel as a 4th axis.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if hasattr(d[key], "meta"):
                d[key].meta["original_channel_dim"] = "no_channel"
        return d


class SaveOverlayd(MapTransform):
    """Write ``<output_dir>/<case>_overlay.png``: image, predicted (and reference) contours, uncertainty.

    The file is named by :func:`~medsegdiff_bundle.data.datalist.output_name` (under the image's sub-folder of
    ``data_root_dir`` when given, as the label maps). Expects channel-first tensors in the same geometry; ``pred_key``
    holds a one-channel label map. 2D arrays follow MONAI's reader convention ``(C, W, H)`` and are transposed for
    display. 3D volumes are reoriented to RAS by their affines first, so that every overlay shows an axial slice in
    radiological convention whatever the file's own orientation (LPS DICOM, RAS NIfTI, a sagittal acquisition); the
    written label maps keep the input's.
    """

    def __init__(
        self,
        output_dir: str | Path,
        image_key: str = "image",
        pred_key: str = "pred",
        label_key: str | None = None,
        uncertainty_key: str | None = "uncertainty",
        data_root_dir: str | Path | None = None,
    ) -> None:
        super().__init__([image_key], allow_missing_keys=True)
        self.output_dir = Path(output_dir)
        self.data_root_dir = data_root_dir
        self.image_key, self.pred_key, self.label_key, self.uncertainty_key = image_key, pred_key, label_key, uncertainty_key
        self.to_ras = Orientation(axcodes="RAS", labels=RAS_AXIS_LABELS)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)

        def arr(key: str | None) -> np.ndarray | None:
            if key is None or key not in d:
                return None
            t = d[key]
            if isinstance(t, MetaTensor) and t.ndim == 4:  # (C, X, Y, Z) in its file's orientation
                t = self.to_ras(t)
            a = torch.as_tensor(t).detach().cpu().float().numpy()
            return np.swapaxes(a, 1, 2) if a.ndim == 3 else a  # (C, W, H) -> (C, H, W) for 2D display

        image, pred, label, unc = (arr(k) for k in (self.image_key, self.pred_key, self.label_key, self.uncertainty_key))
        name = output_name(_source(d, self.image_key), self.data_root_dir)
        save_overlay(
            self.output_dir / f"{name}_overlay.png",
            image,
            pred[0].round().astype(np.int64),
            None if label is None else label[0].round().astype(np.int64),
            None if unc is None else unc[0],
            title=name,
        )
        return d


def normalization_transforms(keys: KeysCollection, normalization: str) -> list:
    """Intensity normalisation: ``rgb`` (/255), ``zscore`` (per channel, MR), ``ct`` (clip [-175, 250] HU -> [0, 1]),
    ``none``."""
    if normalization == "rgb":
        return [ScaleIntensityRanged(keys, a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True)]
    if normalization == "zscore":
        return [NormalizeIntensityd(keys, nonzero=False, channel_wise=True)]
    if normalization == "ct":
        return [ScaleIntensityRanged(keys, a_min=-175.0, a_max=250.0, b_min=0.0, b_max=1.0, clip=True)]
    if normalization == "none":
        return []
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}.")


def build_preprocessing(
    spatial_dims: int,
    stage: str,
    patch_size: Sequence[int],
    num_classes: int,
    normalization: str = "rgb",
    target_spacing: Sequence[float] | None = None,
    label_threshold: float | None = None,
    num_samples: int = 1,
    label_mapping: Mapping[Any, int] | None = None,
    image_key: str = "image",
    label_key: str = "label",
) -> Compose:
    """Pre-processing for ``stage`` in ``train`` / ``validate`` / ``infer`` / ``evaluate``.

    ``evaluate`` loads the label but keeps it in the original geometry (metrics are computed there, on the
    inverted prediction); ``infer`` loads only the image.

    Args:
        spatial_dims: 2 or 3.
        stage: which pipeline.
        patch_size: 2D: the size images are resized to; 3D: training patch size.
        num_classes: classes including background.
        normalization: one of ``NORMALIZATIONS``.
        target_spacing: 3D resampling spacing (mm), or ``None`` to keep the native spacing.
        label_threshold: binarise labels at this value (e.g. 127 for 0/255 masks).
        label_mapping: stored label value -> class index (e.g. ``{"4": 3}`` for BraTS 2021).
        num_samples: 3D training patches per volume.
        image_key, label_key: dictionary keys.
    """
    if stage not in ("train", "validate", "infer", "evaluate"):
        raise ValueError(f"stage must be train, validate, infer or evaluate, got {stage!r}.")
    if len(patch_size) != spatial_dims:
        raise ValueError(f"patch_size {list(patch_size)} needs {spatial_dims} values for spatial_dims={spatial_dims}.")
    with_label = stage != "infer"
    geo_keys = [image_key, label_key] if stage in ("train", "validate") else [image_key]
    load_keys = [image_key, label_key] if with_label else [image_key]
    interp = ["bilinear", "nearest"] if len(geo_keys) == 2 else ["bilinear"]
    xforms: list = [
        LoadImaged(load_keys, allow_missing_keys=stage == "evaluate"),
        EnsureChannelFirstd(load_keys, allow_missing_keys=stage == "evaluate"),
        EnsureTyped(load_keys, dtype=torch.float32, allow_missing_keys=stage == "evaluate"),
    ]
    if spatial_dims == 3:
        xforms.append(Orientationd(geo_keys, axcodes="RAS", labels=RAS_AXIS_LABELS))
        if target_spacing is not None:
            xforms.append(Spacingd(geo_keys, pixdim=list(target_spacing), mode=interp))
    if with_label:
        # the size check only makes sense while image and label share a geometry
        xforms.append(
            PrepareLabeld(label_key, num_classes, label_threshold, image_key if stage != "evaluate" else None, label_mapping)
        )
    xforms += normalization_transforms(image_key, normalization)
    if spatial_dims == 2:
        xforms.append(Resized(geo_keys, spatial_size=list(patch_size), mode=["area", "nearest"][: len(geo_keys)]))
    if stage == "train":
        if spatial_dims == 3:
            xforms += [
                SpatialPadd(geo_keys, spatial_size=list(patch_size)),
                RandCropByPosNegLabeld(geo_keys, label_key, list(patch_size), pos=1, neg=1, num_samples=num_samples),
            ]
        xforms += [RandFlipd(geo_keys, prob=0.5, spatial_axis=a) for a in range(spatial_dims)]
        if spatial_dims == 2:
            xforms += [
                RandRotate90d(geo_keys, prob=0.5),
                RandAffined(geo_keys, prob=0.3, rotate_range=0.26, scale_range=0.1, mode=interp, padding_mode="zeros"),
            ]
        xforms += [
            RandScaleIntensityd(image_key, factors=0.1, prob=0.5),
            RandShiftIntensityd(image_key, offsets=0.1, prob=0.5),
        ]
    pipeline = Compose(xforms)
    # what the pipeline's output depends on: names the on-disk cache of its deterministic part (data.cache)
    pipeline.settings = {
        "spatial_dims": spatial_dims, "stage": stage, "patch_size": [int(v) for v in patch_size],
        "num_classes": int(num_classes), "normalization": normalization,
        "target_spacing": None if target_spacing is None else [float(v) for v in target_spacing],
        "label_threshold": label_threshold, "label_mapping": None if label_mapping is None else dict(label_mapping),
        "image_key": image_key, "label_key": label_key,
    }
    return pipeline


def build_postprocessing(
    preprocessing: Compose,
    output_dir: str | Path | None,
    spatial_dims: int,
    pred_key: str = "pred",
    image_key: str = "image",
    label_key: str | None = None,
    overlay: bool = True,
    invert: bool = True,
    data_root_dir: str | Path | None = None,
) -> Compose:
    """Post-processing of ``DiffusionSegInferer(return_uncertainty=True)`` output.

    Splits the uncertainty channel, inverts prediction, uncertainty and image into the input's own geometry
    (original size in 2D; original affine, spacing and orientation in 3D), takes the argmax label map, and (when
    ``output_dir`` is given) writes ``<case>_seg`` and ``<case>_uncertainty`` (PNG in 2D, NIfTI in 3D) and an overlay.
    With ``data_root_dir`` (:func:`~medsegdiff_bundle.data.datalist.output_root`: cases whose files share a name)
    each case's files go to its image's sub-folder of it, ``<output_dir>/<sub-folder>/<case>_seg``.
    """
    keys = [pred_key, "uncertainty"]
    xforms: list = [SplitUncertaintyd(pred_key)]
    if invert:
        xforms.append(
            Invertd(keys + [image_key], transform=preprocessing, orig_keys=image_key, nearest_interp=False, to_tensor=True)
        )
    xforms += [AsDiscreted(pred_key, argmax=True), MarkSingleChannelMapd(keys)]
    if output_dir is not None:
        ext = ".png" if spatial_dims == 2 else ".nii.gz"
        common = {"output_dir": str(output_dir), "output_ext": ext, "resample": False, "separate_folder": False,
                  "print_log": False, "data_root_dir": str(data_root_dir or "")}
        xforms += [
            SaveImaged(pred_key, output_postfix="seg", output_dtype=np.uint8, **common),
            SaveImaged("uncertainty", output_postfix="uncertainty", output_dtype=np.uint8 if spatial_dims == 2 else np.float32,
                       scale=255 if spatial_dims == 2 else None, **common),
        ]
        if overlay:
            xforms.append(SaveOverlayd(output_dir, image_key, pred_key, label_key, data_root_dir=data_root_dir))
    return Compose(xforms)
