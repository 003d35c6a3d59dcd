"""Bundle plumbing for the MONAI Label app, importable without MONAI Label.

The MONAI Label tasks (:mod:`medsegdiff_bundle.label.infer`, :mod:`medsegdiff_bundle.label.train`) read the
package's own bundle configs (``bundle/configs/inference.json`` / ``train.json``) with a *bundle root* that holds
the weights (``<bundle_root>/models/model.pt``) and, optionally, the model's hyper-parameters as a
``bundle_overrides.json`` (the file ``medsegdiff plan`` / ``medsegdiff auto`` write; any bundle key works, e.g.
``{"spatial_dims": 3, "in_channels": 1, "num_classes": 2, "patch_size": [96, 96, 96], "normalization": "zscore"}``).
Everything here is plain MONAI and runs in the main environment too (the tests check it there).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from ..engine.checkpoint import load_checkpoint
from ..engine.workflow import BUNDLE_CONFIGS
from ..networks import MedSegDiffV2

__all__ = [
    "DEFAULT_BUNDLE_ROOT",
    "OVERRIDES_FILE",
    "bundle_parser",
    "class_labels",
    "load_overrides",
    "pretrained_network",
    "pretrained_network_def",
    "resolve_device",
    "write_train_datalist",
]

logger = logging.getLogger(__name__)

DEFAULT_BUNDLE_ROOT = BUNDLE_CONFIGS.parent
OVERRIDES_FILE = "bundle_overrides.json"


def load_overrides(value: str | None, bundle_root: str | Path) -> dict[str, Any]:
    """Bundle overrides from a conf value: inline JSON (``{...}``), a JSON file path, or ``None`` for
    ``<bundle_root>/bundle_overrides.json`` when it exists (else no overrides).

    Raises:
        ValueError: the value is neither a JSON object nor an existing JSON file holding one.
    """
    if value is None or not str(value).strip():
        path = Path(bundle_root) / OVERRIDES_FILE
        if not path.is_file():
            return {}
        text, where = path.read_text(encoding="utf-8"), str(path)
    elif str(value).lstrip().startswith("{"):
        text, where = str(value), "the inline bundle_overrides value"
    else:
        path = Path(value).expanduser()
        if not path.is_file():
            raise ValueError(f"bundle_overrides: {value!r} is neither inline JSON nor an existing file.")
        text, where = path.read_text(encoding="utf-8"), str(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"bundle_overrides: {where} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"bundle_overrides: {where} must hold a JSON object, got {type(data).__name__}.")
    return data


def _has_parent(parser: ConfigParser, key: str) -> bool:
    parent = key.rsplit("#", 1)[0]
    try:
        parser[parent]
    except (KeyError, IndexError, ValueError, TypeError):
        return False
    return True


def bundle_parser(config: str, bundle_root: str | Path, overrides: Mapping[str, Any] | None = None) -> ConfigParser:
    """A ``ConfigParser`` of ``bundle/configs/<config>.json`` (+ metadata) with ``bundle_root`` and overrides set.

    Nested overrides (``a#b``) whose parent does not exist in this config (e.g. ``train#...`` keys of a training
    plan read by the inference config) are skipped.
    """
    parser = ConfigParser()
    parser.read_meta(str(BUNDLE_CONFIGS / "metadata.json"))
    parser.read_config(str(BUNDLE_CONFIGS / f"{config}.json"))
    parser["bundle_root"] = str(Path(bundle_root).resolve())
    for key, value in (overrides or {}).items():
        if "#" in key and not _has_parent(parser, key):
            logger.debug(f"{config}.json: skipping override {key!r} (no such section)")
            continue
        parser[key] = value
    return parser


def class_labels(num_classes: int, class_names: Sequence[str] | None = None,
                 channel_def: Mapping[str, str] | None = None) -> dict[str, int]:
    """MONAI Label's ``{name: index}`` for the foreground classes ``1..K-1``.

    Names come from ``class_names`` (the bundle key: names of classes ``1..K-1``), else from the metadata's
    ``channel_def`` when it has ``K`` entries, else ``class_<i>``.
    """
    if class_names is not None:
        names = list(class_names)
        if len(names) != num_classes - 1:
            raise ValueError(f"class_names has {len(names)} names; num_classes={num_classes} needs {num_classes - 1}.")
        return {str(n): i for i, n in enumerate(names, 1)}
    if channel_def and len(channel_def) == num_classes:
        return {str(channel_def[str(i)]).lower(): i for i in range(1, num_classes) if str(i) in channel_def}
    return {f"class_{i}": i for i in range(1, num_classes)}


def pretrained_network(weights: str | None = None, **kwargs: Any) -> MedSegDiffV2:
    """``MedSegDiffV2(**kwargs)`` initialised from ``weights`` (a state dict such as ``model.pt``) when it exists.

    Used by the training task to fine-tune from the current model (``network_def`` override).
    """
    net = MedSegDiffV2(**kwargs)
    if weights and os.path.isfile(weights):
        state = load_checkpoint(weights)
        if isinstance(state.get("model"), dict):  # a training checkpoint rather than model.pt
            state = state["model"]
        net.load_state_dict(state, strict=True)
        logger.info(f"initialised the network from {weights}")
    return net


def pretrained_network_def(parser: ConfigParser, weights: str | Path) -> dict[str, Any]:
    """The config's raw ``network_def`` turned into a :func:`pretrained_network` definition loading ``weights``."""
    raw = dict(parser["network_def"])
    raw["_target_"] = f"{__name__}.pretrained_network"
    raw["weights"] = str(weights)
    return raw


def write_train_datalist(
    items: Sequence[Mapping[str, Any]], path: str | Path, val_split: float = 0.2, min_cases: int = 1
) -> dict[str, int]:
    """Write an MSD-style datalist for the bundle's ``train.json`` from MONAI Label datastore items.

    The last ``round(val_split * n)`` cases (at least ``min_cases``) form fold 0, the validation fold; the others
    are fold 1. A single labelled case is used for both training and validation.

    Args:
        items: ``{"image", "label"}`` dicts (absolute paths).
        path: the datalist to write.
        val_split: fraction of the cases used for validation.
        min_cases: cases needed in each of training and validation (the process count of a DDP run, whose
            samplers give every rank at least one case).

    Returns:
        ``{"train": n_train, "validation": n_val}``.

    Raises:
        ValueError: no case, or fewer than ``2 * min_cases`` when ``min_cases > 1``.
    """
    cases = sorted(({"image": d["image"], "label": d["label"]} for d in items), key=lambda c: str(c["image"]))
    if not cases:
        raise ValueError("no labelled image in the datastore (labels/final): nothing to train on.")
    if min_cases > 1 and len(cases) < 2 * min_cases:
        raise ValueError(f"{min_cases} training processes need at least {min_cases} training and {min_cases} "
                         f"validation cases; the datastore has {len(cases)} labelled image(s). Label more images "
                         "or train with fewer processes.")
    if len(cases) == 1:
        entries = [{**cases[0], "fold": 1}, {**cases[0], "fold": 0}]
        counts = {"train": 1, "validation": 1}
    else:
        n_val = min(len(cases) - min_cases, max(min_cases, round(float(val_split) * len(cases))))
        entries = [{**c, "fold": 0 if i >= len(cases) - n_val else 1} for i, c in enumerate(cases)]
        counts = {"train": len(cases) - n_val, "validation": n_val}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"training": entries}, indent=2), encoding="utf-8")
    return counts


def resolve_device(name: Any) -> torch.device:
    """``"cuda"``/``"cuda:1"``/``"cpu"`` (or MONAI Label's device list) -> a device that exists here."""
    name = name[0] if isinstance(name, (list, tuple)) and name else name
    name = str(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if name.startswith("cuda") and not torch.cuda.is_available():
        name = "cpu"
    return torch.device(name)
