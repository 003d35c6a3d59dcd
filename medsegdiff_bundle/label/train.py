"""MONAI Label train task over the bundle's ``train.json`` (one process) or ``train.json`` +
``multi_gpu_train.json`` (``torchrun``, one process per GPU).

What a MONAI Label train request does (``POST /train/medsegdiff`` with params such as ``{"max_epochs": 10}``):

1. the datastore's labelled images (``labels/final``) become ``<bundle_root>/monailabel/datalist.json``; the last
   ``val_split`` of them (at least one) is the validation fold;
2. the model's overrides (``bundle_overrides.json`` or the app's ``bundle_overrides`` conf) plus the request's
   settings are written to ``<bundle_root>/monailabel/train_overrides.json``;
3. with ``pretrained`` (default) and an existing ``<bundle_root>/models/model.pt`` the network starts from it;
4. :func:`medsegdiff_bundle.engine.launch_training` runs the bundle: in this process, or with ``torchrun`` and
   ``multi_gpu_train.json`` when ``multi_gpu`` is on and more than one GPU is selected (``gpus``: ``all`` or
   ``0,1``), one process per GPU. ``processes`` (default 0 = as many as GPUs) sets the process count explicitly;
   without CUDA, ``processes > 1`` trains with DDP over gloo on the CPU. The best EMA weights replace
   ``<bundle_root>/models/model.pt``, which the infer task reloads on its next request; a summary goes to
   ``<bundle_root>/monailabel/last_train.json``.

Needs MONAI Label (``requirements-label.txt``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.others.generic import device_list

from ..engine.fastpath import bf16_is_fast
from ..engine.launch import launch_training
from ..utils import as_bool
from .bundle import bundle_parser, pretrained_network_def, write_train_datalist

__all__ = ["MedSegDiffTrainTask"]

logger = logging.getLogger(__name__)


def _gpus(value: Any) -> list[int]:
    count = torch.cuda.device_count()
    if value in (None, "", "all"):
        return list(range(count))
    return [int(g) for g in str(value).split(",") if g.strip()]


class MedSegDiffTrainTask(TrainTask):
    """Train / fine-tune the bundle on the datastore's labelled images; see the module docstring.

    Args:
        bundle_root: where ``models/`` (checkpoints, ``model.pt``) and ``eval/`` are written.
        overrides: bundle keys for ``train.json`` (model hyper-parameters, patch size, batch size...).
        description: shown by MONAI Label clients.
    """

    def __init__(self, bundle_root: str | Path, overrides: Mapping[str, Any] | None = None,
                 description: str = "Train MedSegDiff-V2 with the bundle's train.json on the labelled images") -> None:
        super().__init__(description)
        self.bundle_root = Path(bundle_root).resolve()
        self.overrides = dict(overrides or {})
        self.parser = bundle_parser("train", self.bundle_root, self.overrides)  # fails early on a bad override

    def config(self) -> dict[str, Any]:
        p = self.parser.get_parsed_content
        return {
            "device": device_list(),
            "max_epochs": int(p("max_epochs")),
            "val_split": 0.2,
            "pretrained": True,
            "resume": False,
            "multi_gpu": True,
            "gpus": "all",
            "processes": 0,
        }

    def info(self) -> dict[str, Any]:
        i = super().info()
        i["bundle_root"] = str(self.bundle_root)
        i["configs"] = ["train.json", "multi_gpu_train.json"]
        return i

    def stats(self) -> dict[str, Any]:
        model = self.bundle_root / "models" / "model.pt"
        return {"model": str(model), "model_exists": model.is_file(),
                "model_ts": int(model.stat().st_mtime) if model.is_file() else None}

    def plan(self, request: Mapping[str, Any], items: list[dict]) -> tuple[Path, int, dict[str, Any]]:
        """Write the datalist and the overrides file for ``request``; returns (overrides file, world size, summary)."""
        work = self.bundle_root / "monailabel"
        datalist = work / "datalist.json"
        gpus = _gpus(request.get("gpus", "all"))
        cuda = torch.cuda.is_available()
        processes = request.get("processes")
        if processes in (None, "", 0, "0"):
            multi = as_bool(request.get("multi_gpu", True), "multi_gpu") and cuda and len(gpus) > 1
            world_size = len(gpus) if multi else 1
        else:
            world_size = int(processes)
            if world_size < 1 or (cuda and world_size > 1 and world_size > len(gpus)):
                raise ValueError(f"processes={world_size} but {len(gpus)} GPU(s) are selected ({gpus}).")
        counts = write_train_datalist(items, datalist, float(request.get("val_split", 0.2)), min_cases=world_size)

        overrides: dict[str, Any] = {
            **self.overrides,
            "datalist": str(datalist),
            "dataset_dir": str(work),
            "fold": 0,
            "synthetic_if_missing": False,
            "max_epochs": int(request.get("max_epochs", self.parser.get_parsed_content("max_epochs"))),
            "resume": as_bool(request.get("resume", False), "resume"),
        }
        model = self.bundle_root / "models" / "model.pt"
        if as_bool(request.get("pretrained", True), "pretrained") and model.is_file():
            overrides["network_def"] = pretrained_network_def(self.parser, model)
        device = request.get("device")
        device = device[0] if isinstance(device, (list, tuple)) and device else device
        if world_size == 1 and (not torch.cuda.is_available() or str(device or "cuda").startswith("cpu")):
            overrides["device"] = "$torch.device('cpu')"
            if "amp" not in self.overrides:  # the bundle's amp may follow a GPU this request does not use
                overrides["amp"] = bf16_is_fast("cpu")
        elif world_size == 1 and device:
            overrides["device"] = f"$torch.device('{device}')"
        path = work / "train_overrides.json"
        path.write_text(json.dumps(overrides, indent=2), encoding="utf-8")
        summary = {"bundle_root": str(self.bundle_root), "datalist": str(datalist), "overrides": str(path),
                   "world_size": world_size, "gpus": gpus[:world_size] if cuda and world_size > 1 else [], **counts}
        return path, world_size, summary

    def __call__(self, request: Mapping[str, Any], datastore: Datastore) -> dict[str, Any]:
        logger.info(f"Train request: {dict(request)}")
        items = [{"image": d["image"], "label": d["label"]} for d in datastore.datalist() if d and d.get("label")]
        overrides_file, world_size, summary = self.plan(request, items)
        logger.info(f"Training: {summary}")
        env_gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
        if summary["gpus"]:
            visible = summary["gpus"]
            if env_gpus:  # select among the already visible ones
                ids = env_gpus.split(",")
                visible = [ids[g] for g in visible]
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in visible)
        try:
            launch_training(self.bundle_root, overrides_file, world_size)
        finally:
            if env_gpus is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = env_gpus
        summary["model"] = str(self.bundle_root / "models" / "model.pt")
        last = self.bundle_root / "monailabel" / "last_train.json"
        last.write_text(json.dumps(summary, indent=2), encoding="utf-8")
        logger.info(f"Training finished: {summary}")
        return summary
