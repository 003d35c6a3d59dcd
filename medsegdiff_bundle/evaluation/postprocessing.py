"""Post-processing chosen on validation cases: keep only the largest connected component, as nnU-Net does.

A segmentation model sometimes adds small islands away from the structure it found (a second polyp-like blob, a
speck of tumour outside the brain). Removing all but the largest connected component fixes that, but it also
deletes true second lesions, so nnU-Net decides it on the validation cases: first for the foreground as one
region, then for each class on top of that decision, each kept only if it raises the mean Dice (here: by more than
the fold's noise, :func:`select_postprocessing`).

The decision needs no second inference pass. For every case and class, Dice is computed under the four variants a
plan can produce, because the largest-component step of one class only sets that class's voxels to background and
so changes no other class's Dice:

* ``raw``: the label map as predicted;
* ``foreground``: the largest component of all foreground classes together (``independent=False``);
* ``per_class``: the largest component of this class alone, on the raw map;
* ``foreground+per_class``: the same on the ``foreground`` map.

:func:`component_candidates` fills that table per case (as :class:`~medsegdiff_bundle.engine.handlers.
MetricsTableHandler` does during an evaluation), :func:`select_postprocessing` turns the validation cases' table
into a plan (JSON: the MONAI ``KeepLargestConnectedComponent`` steps to run after the argmax), and
:func:`dice_under_plan` scores any other evaluated cases under that plan from their own table, without a new pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.transforms import KeepLargestConnectedComponent, KeepLargestConnectedComponentd

from ..utils import read_json_object

__all__ = [
    "CANDIDATES", "component_candidates", "dice_under_plan", "load_postprocessing_plan", "plan_summary",
    "plan_transforms", "select_postprocessing",
]

CANDIDATES = ("raw", "foreground", "per_class", "foreground+per_class")


def _keep_largest(label_map: torch.Tensor, labels: Sequence[int], independent: bool) -> torch.Tensor:
    # on a copy: MONAI's transform edits a tensor input in place, and the caller still scores the map it gave
    keep = KeepLargestConnectedComponent(applied_labels=list(labels), is_onehot=False, independent=independent)
    return keep(label_map.clone())


def _class_dice(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice of classes ``1..K-1`` from one confusion count, as :func:`~medsegdiff_bundle.evaluation.dice_scores`
    scores them (1 for a class absent from both maps) at a fraction of its cost on volumes: no one-hot copies."""
    counts = torch.bincount((target.flatten() * num_classes + pred.flatten()), minlength=num_classes ** 2)
    confusion = counts.view(num_classes, num_classes).double()  # rows: reference class, columns: predicted
    both = torch.diagonal(confusion)[1:]
    total = confusion.sum(0)[1:] + confusion.sum(1)[1:]  # predicted + reference voxels of each class
    return torch.where(total > 0, 2 * both / total.clamp_min(1), torch.ones_like(total)).float()


def component_candidates(pred: torch.Tensor, target: torch.Tensor, num_classes: int, case: str) -> pd.DataFrame:
    """Dice of one case under each largest-component variant (:data:`CANDIDATES`).

    Args:
        pred: predicted label map ``(1, *S)``.
        target: reference label map ``(1, *S)``, same geometry.
        num_classes: classes including background.
        case: the case's name.

    Returns:
        one row per foreground class, columns ``case, class`` (index 1..K-1) and one per variant.
    """
    pred, target = torch.as_tensor(pred).long().cpu(), torch.as_tensor(target).long().cpu()
    if pred.shape != target.shape:
        raise ValueError(f"case {case}: prediction {tuple(pred.shape)} and reference {tuple(target.shape)} differ.")
    for name, m in (("prediction", pred), ("reference", target)):
        if m.numel() and (int(m.min()) < 0 or int(m.max()) >= num_classes):
            raise ValueError(f"case {case}: the {name} holds labels {int(m.min())}..{int(m.max())}, outside the "
                             f"{num_classes} classes 0..{num_classes - 1}.")
    foreground = list(range(1, num_classes))
    maps = {"raw": pred, "foreground": _keep_largest(pred, foreground, independent=False)}
    dice = {name: _class_dice(m, target, num_classes) for name, m in maps.items()}
    if num_classes == 2:  # one class: its own largest component is the foreground's
        dice["per_class"] = dice["foreground+per_class"] = dice["foreground"]
    else:
        for name, base in (("per_class", "raw"), ("foreground+per_class", "foreground")):
            dice[name] = torch.stack([_class_dice(_keep_largest(maps[base], [c], independent=True), target,
                                                  num_classes)[c - 1] for c in foreground])
    return pd.DataFrame({"case": case, "class": foreground, **{n: dice[n].tolist() for n in CANDIDATES}})


def _check_table(table: pd.DataFrame, what: str) -> None:
    missing = [c for c in ("case", "class", *CANDIDATES) if c not in table.columns]
    if missing:
        raise ValueError(f"{what} lacks the column(s) {missing}; it must come from component_candidates.")
    if table.empty:
        raise ValueError(f"{what} holds no case.")


def _decision(before: pd.Series, after: pd.Series, min_gain: float, min_standard_errors: float) -> dict[str, Any]:
    """One step's evidence, per case: apply it if the mean gain beats ``min_gain`` and ``min_standard_errors``
    standard errors of the per-case gains (with one case there is no standard error, so only a zero requirement
    passes)."""
    gain = after - before
    n = len(gain)
    se = float(gain.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    mean_gain = float(gain.mean())
    needed = max(min_gain, min_standard_errors * se if min_standard_errors > 0 else 0.0)
    return {"dice_before": float(before.mean()), "dice_after": float(after.mean()), "gain": mean_gain,
            "standard_error": se if math.isfinite(se) else None, "cases_higher": int((gain > 0).sum()),
            "cases_lower": int((gain < 0).sum()), "applied": bool(mean_gain > needed)}


def select_postprocessing(
    table: pd.DataFrame, min_gain: float = 0.0, min_standard_errors: float = 2.0
) -> dict[str, Any]:
    """nnU-Net's decision, from validation cases' :func:`component_candidates` rows, with a guard for small folds.

    1. Keep the largest component of the foreground as one region if that raises the mean Dice per case.
    2. Then, for each class (with more than one foreground class), keep its own largest component if that raises the
       class's mean Dice, on the map step 1 left.

    A step counts as raising the Dice when its mean gain over the cases exceeds ``min_gain`` and
    ``min_standard_errors`` standard errors of the per-case gains. nnU-Net decides on the cross-validation
    predictions of every training case; one validation fold of a few dozen cases holds only the handful a step
    changes, and a wrong step deletes a true lesion (a Dice of 0.4 becomes 0) where a right one removes a small
    island, so a gain within the fold's noise is not taken. ``min_standard_errors=0`` decides on the mean alone.

    Returns:
        the plan: ``steps``, a list of ``{"labels": [...], "independent": bool}`` (the arguments of MONAI's
        ``KeepLargestConnectedComponent``, in order; empty when nothing helped), and ``scores``: how many cases
        chose it and, for each decision, their mean Dice before and after, the mean gain and its standard error,
        the cases higher and lower, and whether it was applied, so that the choice can be checked.
    """
    _check_table(table, "the candidate table")
    classes = sorted(int(c) for c in table["class"].unique())
    per_case = table.groupby("case")[list(CANDIDATES)].mean()
    foreground = _decision(per_case["raw"], per_case["foreground"], min_gain, min_standard_errors)
    use_fg = foreground["applied"]
    steps: list[dict[str, Any]] = [{"labels": classes, "independent": False}] if use_fg else []
    record: dict[str, Any] = {"cases": int(len(per_case)), "min_gain": min_gain,
                              "min_standard_errors": min_standard_errors, "foreground": foreground, "classes": {}}
    if len(classes) > 1:
        base, cand = ("foreground", "foreground+per_class") if use_fg else ("raw", "per_class")
        for c in classes:
            rows = table[table["class"] == c]
            record["classes"][str(c)] = decision = _decision(rows[base], rows[cand], min_gain, min_standard_errors)
            if decision["applied"]:
                steps.append({"labels": [c], "independent": True})
    plan = {"steps": steps, "scores": record}
    record["dice_after"] = float(dice_under_plan(table, plan).mean())
    record["dice_before"] = float(per_case["raw"].mean())
    return plan


def dice_under_plan(table: pd.DataFrame, plan: dict[str, Any]) -> pd.Series:
    """Each case's Dice (mean over classes) under ``plan``, from the cases' :func:`component_candidates` rows.

    The plan must have :func:`select_postprocessing`'s form (the table holds no other variant): at most one
    foreground step, first and over every class, then steps of single classes.
    """
    _check_table(table, "the candidate table")
    steps = _checked_steps(plan, "the plan")
    classes = sorted(int(c) for c in table["class"].unique())
    use_fg = any(not s["independent"] for s in steps)
    if use_fg and (steps[0]["independent"] or sorted(steps[0]["labels"]) != classes
                   or any(not s["independent"] for s in steps[1:])):
        raise ValueError(f"the plan {steps} cannot be scored from the candidate table: its foreground step must come "
                         f"first, once, over every class {classes}.")
    own = {c for s in steps if s["independent"] for c in s["labels"]}
    column = [("foreground+per_class" if c in own else "foreground") if use_fg
              else ("per_class" if c in own else "raw") for c in table["class"]]
    values = table[list(CANDIDATES)].to_numpy()
    chosen = pd.Series(values[np.arange(len(table)), [CANDIDATES.index(c) for c in column]], index=table.index)
    return chosen.groupby(table["case"]).mean()


def _checked_steps(plan: Any, what: str) -> list[dict[str, Any]]:
    steps = plan.get("steps") if isinstance(plan, dict) else None
    if not isinstance(steps, list):
        raise ValueError(f"{what} must be a JSON object with a list 'steps', got {plan!r:.200}.")
    for i, step in enumerate(steps):
        ok = (isinstance(step, dict) and isinstance(step.get("labels"), list) and step["labels"]
              and all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in step["labels"])
              and isinstance(step.get("independent"), bool))
        if not ok:
            raise ValueError(f"{what}: steps[{i}] must be {{'labels': [positive class indices], 'independent': "
                             f"true/false}}, got {step!r:.200}.")
    return steps


def load_postprocessing_plan(plan: str | Path | dict | None) -> list[dict[str, Any]]:
    """The steps of a plan given as a dict, a path to its JSON (``postprocessing.json`` written by an evaluation) or
    ``None`` (no steps). Raises ``FileNotFoundError``/``ValueError`` naming the file and the bad field."""
    if plan is None or (isinstance(plan, str) and not plan.strip()):
        return []
    if isinstance(plan, dict):
        return _checked_steps(plan, "postprocessing plan")
    return _checked_steps(read_json_object(plan, "postprocessing plan"), f"postprocessing plan {str(plan)!r}")


def plan_transforms(plan: str | Path | dict | None, key: str = "pred") -> list[KeepLargestConnectedComponentd]:
    """The plan's steps as MONAI transforms on the label map under ``key`` (``(1, *S)``, after the argmax)."""
    return [KeepLargestConnectedComponentd(key, applied_labels=s["labels"], is_onehot=False,
                                           independent=s["independent"]) for s in load_postprocessing_plan(plan)]


def plan_summary(plan: dict[str, Any]) -> str:
    """One line for logs: what the plan does and the Dice of the cases that chose it, before and after."""
    val = plan.get("scores", {})
    what = "; ".join(f"keep the largest component of class {s['labels'][0]}" if s["independent"] else
                     f"keep the largest component of the foreground (classes {'/'.join(map(str, s['labels']))})"
                     for s in plan["steps"]) or "no post-processing"
    before, after = val.get("dice_before", math.nan), val.get("dice_after", math.nan)
    return f"{what} (Dice {before:.4f} -> {after:.4f} over the {val.get('cases', '?')} cases that chose it)"
