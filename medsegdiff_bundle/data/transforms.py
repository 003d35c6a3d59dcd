"""MONAI transform pipelines for training, validation, inference and evaluation, in 2D and 3D.

The bundle configs call these builders with values from the plan (patch size, spacing, normalisation), so
the JSON stays wiring and the choices live here, testable. Custom transforms are the few MONAI does not have:
label clean-up with case-naming errors, splitting the inferer's uncertainty channel, and overlay pictures.

2D images (PNG/JPG/BMP, RGB or grey) are resized to ``patch_size`` as in the paper (256² there) and inverted back
to their own size after inference. 3D volumes (NIfTI, NRRD/MHA, DICOM series) are reoriented to RAS, optionally
resampled to ``target_spacing``, trained on random patches and inferred with a sliding window. Training augments
with one of ``AUGMENTATIONS`` (:func:`augmentation_transforms`).
"""

from __future__ import annotations

import math
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
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandRotate90d,
    RandRotated,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandShiftIntensityd,
    RandSimulateLowResolutiond,
    RandZoomd,
    Resized,
    SaveImaged,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from ..evaluation.postprocessing import plan_transforms
from ..evaluation.visualize import save_overlay
from .datalist import output_name

__all__ = [
    "AUGMENTATIONS",
    "NORMALIZATIONS",
    "RAS_AXIS_LABELS",
    "PrepareLabeld",
    "SplitTrailingChannelsd",
    "SplitUncertaintyd",
    "MarkSingleChannelMapd",
    "SaveOverlayd",
    "normalization_transforms",
    "augmentation_transforms",
    "build_preprocessing",
    "build_postprocessing",
]

NORMALIZATIONS = ("rgb", "zscore", "ct", "none")
AUGMENTATIONS = ("default", "nnunet", "none")
# the axis labels MONAI's Orientation has always read "RAS" with; named explicitly since MONAI deprecates that default
# (a FutureWarning for every 3D pipeline), so that plans, checkpoints and overlays keep the orientation they had
RAS_AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
# torch.nn.functional.interpolate's linear mode per spatial_dims (Zoom and the low-resolution simulation use it)
_LINEAR = {2: "bilinear", 3: "trilinear"}


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


def _light_augmentation(spatial_dims: int, image_key: str, label_key: str) -> list:
    """``default`` after the flips: 2D right-angle rotations and a small affine, then intensity scale and shift."""
    xforms: list = []
    if spatial_dims == 2:
        keys = [image_key, label_key]
        xforms += [
            RandRotate90d(keys, prob=0.5),
            RandAffined(keys, prob=0.3, rotate_range=0.26, scale_range=0.1, mode=["bilinear", "nearest"],
                        padding_mode="zeros"),
        ]
    return xforms + [
        RandScaleIntensityd(image_key, factors=0.1, prob=0.5),
        RandShiftIntensityd(image_key, offsets=0.1, prob=0.5),
    ]


def _nnunet_spatial(spatial_dims: int, crop: list, image_key: str, label_key: str) -> list:
    """nnU-Net's spatial transform after the (3D) patch ``crop``: rotation (p 0.2; 2D ±180°, 3D ±30° about each
    axis) and one scale factor for all axes (p 0.2, 0.7-1.4), each drawn on its own; no elastic deformation.

    In 3D, crop, rotation and scaling are resampled lazily, in one interpolation from the whole (padded) volume: a
    rotated or shrunk patch then shows the volume around it, as nnU-Net's (which crops a larger region first),
    instead of the zeros that transforming the cropped patch leaves; only beyond the volume's border is it zero
    padded. The ``overrides`` name each key's interpolation because MONAI 1.6's lazy resampling drops the
    transforms' own ``mode`` (MONAI issue 6850: labels came out interpolated), and keep float32, so that the whole
    volume is not copied to float64 for each patch. 2D images are resized whole (nothing around them to show) and
    transformed one transform at a time: MONAI 1.6's lazy 2D transforms that do not fire leave a 3D identity that
    the next one cannot be combined with.
    """
    keys = [image_key, label_key]
    angle = math.pi if spatial_dims == 2 else math.pi / 6
    spatial = [
        RandRotated(keys, range_x=angle, range_y=angle, range_z=angle, prob=0.2, mode=["bilinear", "nearest"],
                    padding_mode="zeros"),
        # a scalar zoom range draws one factor for all axes
        RandZoomd(keys, prob=0.2, min_zoom=0.7, max_zoom=1.4, mode=[_LINEAR[spatial_dims], "nearest"],
                  padding_mode="constant"),
    ]
    if spatial_dims == 2:
        return crop + spatial
    resample = {"padding_mode": "zeros", "dtype": torch.float32}
    overrides = {image_key: {"mode": "bilinear", **resample}, label_key: {"mode": "nearest", **resample}}
    return [Compose(crop + spatial, lazy=True, overrides=overrides)]


def _nnunet_intensity(spatial_dims: int, image_key: str) -> list:
    """nnU-Net's intensity transforms, in its order, on the image only (after normalisation)."""
    return [
        # nnU-Net draws the variance in (0, 0.1); MONAI draws the standard deviation in (0, sqrt(0.1))
        RandGaussianNoised(image_key, prob=0.1, mean=0.0, std=math.sqrt(0.1)),
        RandGaussianSmoothd(image_key, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.2),
        # brightness and contrast: a factor per channel, as nnU-Net's; contrast about the channel's mean, clipped to
        # its range
        RandScaleIntensityd(image_key, factors=0.25, prob=0.15, channel_wise=True),
        RandScaleIntensityFixedMeand(image_key, factors=0.25, fixed_mean=True, preserve_range=True, prob=0.15,
                                     channel_wise=True),
        RandSimulateLowResolutiond(image_key, prob=0.25, zoom_range=(0.5, 1.0), downsample_mode="nearest-exact",
                                   upsample_mode=_LINEAR[spatial_dims]),
    ] + [
        # gamma on the inverted image, then on the image itself, both keeping its mean and standard deviation
        RandAdjustContrastd(image_key, prob=prob, gamma=(0.7, 1.5), invert_image=invert, retain_stats=True)
        for prob, invert in ((0.1, True), (0.3, False))
    ]


def augmentation_transforms(
    spatial_dims: int,
    augmentation: str,
    patch_size: Sequence[int],
    num_samples: int = 1,
    image_key: str = "image",
    label_key: str = "label",
) -> list:
    """The random part of the training pre-processing: the 3D patch crop and the ``augmentation``.

    It follows the deterministic part (loading, normalisation, 2D resizing, 3D padding to at least ``patch_size``)
    that the dataset caches (:mod:`~medsegdiff_bundle.data.cache`), so the choice never changes that cache.
    Geometric transforms move image and label together (bilinear / nearest); intensity transforms touch the image.

    * ``default``: the bundle's light augmentation, which its results so far were trained with: mirroring along
      each axis (p 0.5); in 2D 90° rotations (p 0.5) and an affine (p 0.3: ±15°, scale ±10 %); intensity scale
      and shift (±0.1, p 0.5 each).
    * ``nnunet``: nnU-Net v2's default training augmentation: rotation and scaling (:func:`_nnunet_spatial`), noise,
      blur, brightness, contrast, low resolution, gamma (:func:`_nnunet_intensity`) and mirroring along each axis
      (p 0.5). Where it differs from nnU-Net's own: the noise's standard deviation (not its variance) and gamma
      (nnU-Net: below 1 half of the time) are drawn uniformly; blur, low resolution and gamma act on all channels
      at once (nnU-Net: each channel on its own, blur and low resolution with p 0.5 each); 3D data with
      anisotropic patches get no 2D-only variant.
    * ``none``: no augmentation (2D: the resized images themselves, as validated; 3D: random patches).

    Args:
        spatial_dims: 2 or 3.
        augmentation: one of ``AUGMENTATIONS``.
        patch_size: 3D training patch size (2D images are already resized to it).
        num_samples: 3D patches per volume.
        image_key: key of the channel-first image, ``(C, H, W[, D])``.
        label_key: key of the class-index label, ``(1, H, W[, D])``.

    Raises:
        ValueError: an unknown ``augmentation``.
    """
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {augmentation!r}.")
    keys = [image_key, label_key]
    crop = [] if spatial_dims == 2 else [
        RandCropByPosNegLabeld(keys, label_key, list(patch_size), pos=1, neg=1, num_samples=num_samples)
    ]
    if augmentation == "none":
        return crop
    flips = [RandFlipd(keys, prob=0.5, spatial_axis=a) for a in range(spatial_dims)]
    if augmentation == "default":
        return crop + flips + _light_augmentation(spatial_dims, image_key, label_key)
    spatial = _nnunet_spatial(spatial_dims, crop, image_key, label_key)
    return spatial + _nnunet_intensity(spatial_dims, image_key) + flips  # nnU-Net mirrors last


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
    augmentation: str = "default",
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
        augmentation: training augmentation, one of ``AUGMENTATIONS`` (:func:`augmentation_transforms`); other
            stages ignore it.
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
            xforms.append(SpatialPadd(geo_keys, spatial_size=list(patch_size)))
        xforms += augmentation_transforms(spatial_dims, augmentation, patch_size, num_samples, image_key, label_key)
    # lazy=None: each transform's own setting, so that only the lazily resampled block of "nnunet" (3D) runs lazily
    pipeline = Compose(xforms, lazy=None)
    # what the pipeline's deterministic part depends on: names its on-disk cache (data.cache). The random part that
    # follows (augmentation, num_samples) is left out, so that changing it keeps the cache (tested: the same prefix)
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
    postprocessing_plan: str | Path | dict | None = None,
) -> Compose:
    """Post-processing of ``DiffusionSegInferer(return_uncertainty=True)`` output.

    Splits the uncertainty channel, inverts prediction, uncertainty and image into the input's own geometry
    (original size in 2D; original affine, spacing and orientation in 3D), takes the argmax label map, and (when
    ``output_dir`` is given) writes ``<case>_seg`` and ``<case>_uncertainty`` (PNG in 2D, NIfTI in 3D) and an overlay.
    With ``data_root_dir`` (:func:`~medsegdiff_bundle.data.datalist.output_root`: cases whose files share a name)
    each case's files go to its image's sub-folder of it, ``<output_dir>/<sub-folder>/<case>_seg``.
    ``postprocessing_plan`` (a ``postprocessing.json`` that an evaluation of validation cases chose, or its dict;
    :mod:`~medsegdiff_bundle.evaluation.postprocessing`) keeps the largest connected components it names, after the
    argmax and before anything is written or scored.
    """
    keys = [pred_key, "uncertainty"]
    xforms: list = [SplitUncertaintyd(pred_key)]
    if invert:
        xforms.append(
            Invertd(keys + [image_key], transform=preprocessing, orig_keys=image_key, nearest_interp=False, to_tensor=True)
        )
    xforms += [AsDiscreted(pred_key, argmax=True), *plan_transforms(postprocessing_plan, pred_key),
               MarkSingleChannelMapd(keys)]
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
