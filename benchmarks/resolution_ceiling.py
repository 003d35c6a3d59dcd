#!/usr/bin/env python
"""The best Dice a 2D model can score at original resolution when it predicts at ``size x size``.

The 2D models here (MedSegDiff-V2 through the bundle, DynUNet in ``quality.py``) see each image resized to the
training size and predict class probabilities there, which the evaluation inverts to the image's own size
(``Invertd`` on the ``evaluate`` pre-processing) before the argmax and the metrics. This script hands that evaluation
the best prediction such a model can make, the ground truth itself resized to the training size as the image is
(one-hot, ``area``), and scores it against the original mask as ``quality.py`` scores a model. What it loses is what
the training size alone costs; a model's shortfall beyond it is the model's.

On the held-out cases of Kvasir-SEG's fixed split (``benchmarks/splits/kvasir_seg_split.json``) by default, every case
with ``--all-cases``, or any ``--data`` folder of ``images/<id>.<ext>`` with ``masks/<id>.<ext>``.

Example::

    python benchmarks/resolution_ceiling.py --sizes 128 256 \\
        --out benchmarks/results/resolution_ceiling_cpu-2c_2026-11-27.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cpu_result import cpu_result, write_result  # also puts the repository root on sys.path
# the quality benchmark's data, split and label settings, so that the ceiling is of the cases it scores
from quality import DEFAULT_DATA, LABEL_THRESHOLD, NUM_CLASSES, SPLIT_FILE


def find_cases(data: Path, ids: list[str] | None = None) -> list[dict]:
    """``{"id", "image", "label"}`` for each image of ``data/images`` with a mask of the same name in ``data/masks``
    (sorted by id), restricted to ``ids`` when given.

    Raises:
        FileNotFoundError: no such pairs, or an id of ``ids`` without both files (the message names the folder).
    """
    images = {p.stem: p for p in sorted((data / "images").glob("*")) if (data / "masks" / p.name).is_file()}
    if not images:
        raise FileNotFoundError(f"{data}: no images/<id> with a mask masks/<id> of the same name.")
    missing = sorted(set(ids or []) - set(images))
    if missing:
        raise FileNotFoundError(f"{data}: no image with a mask for {len(missing)} split case(s), e.g. {missing[:3]}.")
    return [{"id": i, "image": str(images[i]), "label": str(data / "masks" / images[i].name)} for i in (ids or images)]


def ceiling_dices(cases: list[dict], size: int, label_threshold: float = LABEL_THRESHOLD) -> list[float]:
    """Foreground Dice, at each case's original resolution, of its own ground truth predicted at ``size x size``.

    Each mask is one-hot encoded (2, H, W), resized to (2, size, size) with ``area`` (the image's interpolation, so
    that a pixel's probability is the share of foreground it covers), inverted by the ``evaluate`` pre-processing's
    ``Invertd`` as the models' probabilities are, then argmax-ed and scored against the (1, H, W) mask.
    """
    import torch.nn.functional as F
    from monai.data import MetaTensor
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot
    from monai.transforms import Invertd

    from medsegdiff_bundle.data.transforms import build_preprocessing

    pre = build_preprocessing(2, "evaluate", [size, size], NUM_CLASSES, "rgb", label_threshold=label_threshold)
    invert = Invertd(["pred"], transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True)
    dices = []
    for case in cases:
        data = pre({"image": case["image"], "label": case["label"]})
        truth = one_hot(data["label"].as_tensor()[None].long(), num_classes=NUM_CLASSES)  # (1, 2, H, W)
        probabilities = F.interpolate(truth.float(), size=(size, size), mode="area")[0]
        # the network's output carries the image's metadata and transform record, as MONAI's evaluator passes it on
        image = data["image"]
        data["pred"] = MetaTensor(probabilities, meta=image.meta, applied_operations=image.applied_operations)
        restored = invert(data)["pred"].argmax(0, keepdim=True)  # (1, H, W)
        if restored.shape != data["label"].shape:
            raise RuntimeError(f"{case['image']}: inverted to {tuple(restored.shape)}, the mask is "
                               f"{tuple(data['label'].shape)}")
        prediction = one_hot(restored[None].long(), num_classes=NUM_CLASSES)
        dices.append(float(compute_dice(prediction, truth, include_background=False, ignore_empty=False)))
    return dices


def summary(cases: list[dict], dices: list[float], lowest: int = 3) -> dict:
    """Mean, minimum and 5th percentile of ``dices``, and the ``lowest`` cases by id."""
    import numpy as np

    order = np.argsort(dices)[:lowest]
    return {"cases": len(dices), "dice_mean": float(np.mean(dices)), "dice_min": float(np.min(dices)),
            "dice_p5": float(np.percentile(dices, 5)),
            "lowest": {cases[i]["id"]: float(dices[i]) for i in order}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of images/<id> and masks/<id>")
    p.add_argument("--all-cases", action="store_true",
                   help="every case of --data instead of the held-out cases of Kvasir-SEG's fixed split")
    p.add_argument("--sizes", type=int, nargs="+", default=[256], help="training sizes (square) to score")
    p.add_argument("--label-threshold", type=float, default=LABEL_THRESHOLD, help="binarise 0..255 masks")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default: print only)")
    args = p.parse_args(argv)
    if any(s < 1 for s in args.sizes):
        p.error(f"--sizes must be positive, got {args.sizes}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    ids = None if args.all_cases else json.loads(SPLIT_FILE.read_text(encoding="utf-8"))["test_ids"]
    cases = find_cases(args.data, ids)
    by_size = {}
    for size in args.sizes:
        by_size[str(size)] = summary(cases, ceiling_dices(cases, size, args.label_threshold))
        s = by_size[str(size)]
        print(f"{size:>5}^2: ceiling Dice {s['dice_mean']:.4f} (min {s['dice_min']:.4f}, 5th percentile "
              f"{s['dice_p5']:.4f}) over {s['cases']} cases")
    result = cpu_result("resolution_ceiling", args, data=str(args.data),
                        cases="every case" if args.all_cases else f"the fixed split's test cases ({SPLIT_FILE.name})",
                        by_size=by_size)
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
