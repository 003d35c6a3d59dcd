"""MONAI Label infer task serving the MedSegDiff-V2 bundle: label map + uncertainty map.

The task reads ``bundle/configs/inference.json`` (network, pre-processing, ``DiffusionSegInferer``) with a bundle
root holding ``models/model.pt`` and the model's overrides (see :mod:`medsegdiff_bundle.label.bundle`), so the
server runs exactly what ``medsegdiff infer`` runs:

* pre-processing: the bundle's ``build_preprocessing(stage="infer")`` (load, channel first, RAS + optional
  resampling in 3D, normalisation; resize in 2D);
* inference: ``DiffusionSegInferer(return_uncertainty=True)`` (ensemble sampling, fusion, sliding window in 3D);
  ``sampler``, ``steps``, ``ensemble``, ``seed``, ``anchor_weight`` and ``mirror`` (test-time mirroring along every
  spatial axis, or none) can be changed per request (MONAI Label ``params``);
* post-processing: the bundle's ``build_postprocessing`` (split off the uncertainty channel, invert every
  pre-processing step into the input's own geometry, argmax; the largest-component steps of the config's
  ``postprocessing_plan`` when one is set), then:

  - the **label map** (class indices, ``uint8``) is what MONAI Label's writer returns, in the input's size and
    affine (``.nii.gz`` for NIfTI inputs);
  - the **uncertainty map** (per-voxel ensemble std or entropy, ``float32``, same geometry) is written to
    ``<uncertainty_dir>/<image>_uncertainty.nii.gz`` and described in the result JSON under ``"uncertainty"``
    (``file``, ``kind``, ``min``/``max``/``mean``). The app also stores it in the datastore (see ``main.py``).

Needs MONAI Label (``requirements-label.txt``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import LoadImaged, MapTransform
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from ..data.datalist import strip_image_extension
from ..data.transforms import build_postprocessing
from ..diffusion.schedulers import SAMPLERS
from ..engine.fastpath import bf16_is_fast
from ..engine.inferer import DiffusionSegInferer
from ..evaluation.postprocessing import load_postprocessing_plan
from ..utils import as_bool, atomic_path
from .bundle import bundle_parser, class_labels

__all__ = ["ImageReadError", "MedSegDiffInferTask", "SaveUncertaintyd", "SqueezeLabeld", "UNCERTAINTY_KEY"]

logger = logging.getLogger(__name__)

UNCERTAINTY_KEY = "uncertainty"


class ImageReadError(RuntimeError):
    """The input image could not be read (missing, corrupt or an unsupported format)."""


def image_stem(path: str | os.PathLike | None) -> str:
    """File name without the image extension (``case.nii.gz`` -> ``case``)."""
    return strip_image_extension(Path(str(path or "image")).name)


def _affine4(affine: Any) -> np.ndarray:
    """A 4x4 affine from MONAI's ``(d+1, d+1)`` one (2D images carry 3x3)."""
    a = np.asarray(torch.as_tensor(affine).detach().cpu().double())
    if a.shape == (4, 4):
        return a
    d = a.shape[0] - 1
    out = np.eye(4)
    out[:d, :d] = a[:d, :d]
    out[:d, 3] = a[:d, d]
    return out


class GuardedLoadImaged(MapTransform):
    """Run a ``LoadImaged`` and turn any failure into an :class:`ImageReadError` that names the file."""

    def __init__(self, load: LoadImaged, max_message: int = 400) -> None:
        super().__init__(load.keys)
        self.load = load
        self.max_message = max_message

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        try:
            return self.load(data)
        except Exception as e:  # noqa: BLE001 - every reader error means the same thing to the client
            names = [str(data.get(k)) for k in self.keys if isinstance(data.get(k), (str, os.PathLike))]
            reason = " ".join(f"{type(e).__name__}: {e}".split())
            if len(reason) > self.max_message:
                reason = reason[: self.max_message] + "..."
            raise ImageReadError(f"cannot read image {', '.join(names) or '<in-memory>'}: {reason}") from e


class SaveUncertaintyd(MapTransform):
    """Write the (inverted) uncertainty map as float32 NIfTI with the image's affine and describe it in the result.

    Writes ``<output_dir>/<image>_uncertainty.nii.gz`` (atomically) and sets ``data[result_key]["uncertainty"] =
    {"file", "kind", "min", "max", "mean"}``.
    """

    def __init__(self, output_dir: str | Path, key: str = UNCERTAINTY_KEY, kind: str = "std",
                 result_key: str = "result", path_key: str = "image_path") -> None:
        super().__init__([key])
        self.output_dir = Path(output_dir)
        self.key, self.kind, self.result_key, self.path_key = key, kind, result_key, path_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        unc = d[self.key]
        arr = torch.as_tensor(unc).detach().cpu().float().numpy()
        arr = arr[0] if arr.ndim > 2 and arr.shape[0] == 1 else arr
        affine = _affine4(unc.affine) if isinstance(unc, MetaTensor) else np.eye(4)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / f"{image_stem(d.get(self.path_key))}_uncertainty.nii.gz"
        with atomic_path(path, suffix=".nii.gz") as tmp:
            nib.save(nib.Nifti1Image(arr.astype(np.float32), affine), tmp)
        result = dict(d.get(self.result_key) or {})
        result["uncertainty"] = {
            "file": str(path),
            "kind": self.kind,
            "shape": list(arr.shape),
            "min": float(arr.min()) if arr.size else 0.0,
            "max": float(arr.max()) if arr.size else 0.0,
            "mean": float(arr.mean()) if arr.size else 0.0,
        }
        d[self.result_key] = result
        d[self.key] = arr  # the map is on disk; keep the data dict light
        return d


class SqueezeLabeld(MapTransform):
    """``(1, *S)`` label map -> ``(*S)`` with its affine in ``<key>_meta_dict`` (what MONAI Label's writer reads)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            affine = _affine4(pred.affine) if isinstance(pred, MetaTensor) else None
            if isinstance(pred, MetaTensor) and pred.affine.shape[0] == 3:
                affine = np.asarray(pred.affine.detach().cpu().double())  # 2D writers take no 4x4
            arr = torch.as_tensor(pred).detach().cpu()
            arr = arr[0] if arr.ndim > 2 and arr.shape[0] == 1 else arr
            d[key] = arr.numpy()
            d[f"{key}_meta_dict"] = {"affine": affine}
        return d


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) and value else value


class MedSegDiffInferTask(BasicInferTask):
    """Segmentation with the MedSegDiff-V2 bundle; see the module docstring.

    Args:
        bundle_root: folder with ``models/model.pt`` (and optionally ``bundle_overrides.json``).
        overrides: bundle keys for ``inference.json`` (model hyper-parameters, sampler settings...).
        uncertainty_dir: where uncertainty maps are written (default: ``<tmp>/medsegdiff_label/uncertainty``).
        preload: build the network on every device at start-up.
        description: shown by MONAI Label clients.
    """

    def __init__(
        self,
        bundle_root: str | Path,
        overrides: Mapping[str, Any] | None = None,
        uncertainty_dir: str | Path | None = None,
        preload: bool = False,
        description: str = "MedSegDiff-V2 diffusion segmentation (label map + uncertainty map)",
    ) -> None:
        self.bundle_root = Path(bundle_root).resolve()
        self.parser = bundle_parser("inference", self.bundle_root, overrides)
        p = self.parser.get_parsed_content
        self.spatial_dims = int(p("spatial_dims"))
        self.num_classes = int(p("num_classes"))
        self.uncertainty_kind = str(p("uncertainty"))
        self.uncertainty_dir = Path(uncertainty_dir) if uncertainty_dir else (
            Path(tempfile.gettempdir()) / "medsegdiff_label" / "uncertainty")
        # one Compose for every request: Invertd matches the applied operations against these transform instances
        self.preprocessing = p("preprocessing", instantiate=True)
        network = p("network_def", instantiate=True)
        class_names = p("class_names") if "class_names" in self.parser.config else None
        # read once here, so that a bad plan file fails at start-up, naming the file, not at the first request
        plan = p("postprocessing_plan") if "postprocessing_plan" in self.parser.config else None
        self.postprocessing_plan = {"steps": load_postprocessing_plan(plan)}
        channel_def = self.parser.get("_meta_#network_data_format#outputs#pred#channel_def")
        labels = class_labels(self.num_classes, class_names, channel_def)
        sampler = str(p("sampler"))
        config = {
            "sampler": [sampler] + [s for s in SAMPLERS if s != sampler],
            "steps": int(p("steps")),
            "ensemble": int(p("ensemble")),
            "seed": p("seed"),
            "anchor_weight": float(p("anchor_weight")),
            "mirror": bool(p("mirror_axes")),
        }
        ckpt = str(p("ckpt_path"))
        super().__init__(
            path=ckpt,
            network=network,
            type=InferType.SEGMENTATION,
            labels=labels,
            dimension=self.spatial_dims,
            description=description,
            config=config,
            load_strict=True,
            preload=preload and os.path.isfile(ckpt),  # nothing to preload before training wrote the weights
        )

    def is_valid(self) -> bool:
        # BasicInferTask counts a network definition as valid; without weights it would sample from noise
        return bool(self.get_path())

    def _get_network(self, device: str, data: Any) -> Any:
        if not self.get_path():
            raise FileNotFoundError(f"no model weights at {self.get_path(validate=False)}; train the model first.")
        return super()._get_network(device, data)

    def info(self) -> dict[str, Any]:
        i = super().info()
        i["bundle_root"] = str(self.bundle_root)
        i["num_classes"] = self.num_classes
        i["outputs"] = {"label": "class-index map (uint8) in the input's geometry",
                        "uncertainty": f"ensemble {self.uncertainty_kind} (float32 NIfTI), see result 'uncertainty'"}
        return i

    def pre_transforms(self, data: Mapping | None = None) -> Sequence[Callable]:
        return [GuardedLoadImaged(t) if isinstance(t, LoadImaged) else t for t in self.preprocessing.transforms]

    def inferer(self, data: Mapping | None = None) -> Inferer:
        cfg = self.parser["inferer"]
        kwargs = {k: self.parser.get_parsed_content(f"inferer#{k}") for k in cfg if k != "_target_"}
        data = data or {}
        for key, cast in (("sampler", str), ("steps", int), ("ensemble", int), ("seed", int),
                           ("anchor_weight", float)):
            value = _first(data.get(key))
            if value is not None and value != "":
                kwargs[key] = cast(value)
        mirror = _first(data.get("mirror"))
        if mirror is not None and mirror != "":
            kwargs["mirror_axes"] = list(range(self.spatial_dims)) if as_bool(mirror, "mirror") else []
        if kwargs.get("sampler") not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {kwargs.get('sampler')!r}.")
        kwargs["return_uncertainty"] = True
        if not str(data.get("device", "cpu")).startswith("cuda"):
            # the config's default follows the config's device, which may be a GPU this request does not use
            kwargs["amp"] = as_bool(kwargs.get("amp", False), "amp") and bf16_is_fast("cpu")
        return DiffusionSegInferer(**kwargs)

    def inverse_transforms(self, data: Mapping | None = None) -> None:
        return None  # the bundle's post-processing inverts prediction and uncertainty itself (Invertd)

    def post_transforms(self, data: Mapping | None = None) -> Sequence[Callable]:
        post = build_postprocessing(self.preprocessing, None, self.spatial_dims, pred_key=self.output_label_key,
                                    image_key=self.input_key, overlay=False,
                                    postprocessing_plan=self.postprocessing_plan)
        return list(post.transforms) + [
            SaveUncertaintyd(self.uncertainty_dir, UNCERTAINTY_KEY, self.uncertainty_kind, self.output_json_key),
            SqueezeLabeld(self.output_label_key),
        ]

    def writer(self, data: dict[str, Any], extension: str | None = None, dtype: Any = None) -> tuple[Any, Any]:
        return super().writer(data, extension, dtype if dtype is not None else np.uint8)
