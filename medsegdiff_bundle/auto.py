"""``medsegdiff auto``: fingerprint -> plan -> train -> evaluate, resumable where it stopped.

Every stage writes its result into ``output`` and is skipped when that result is already there:
``fingerprint.json``, ``plans.json`` + ``bundle_overrides.json``, the training checkpoints in ``models/`` (training
resumes from the newest one until ``auto_state.json`` records it finished), and ``eval/evaluation/metrics.csv``.
Running the same command again after an interruption therefore continues instead of starting over.

The evaluation of the validation fold also chooses nnU-Net's post-processing (keep the largest connected component
where that raised the fold's Dice; :mod:`medsegdiff_bundle.evaluation.postprocessing`). The plan is copied to
``models/postprocessing.json``, beside the weights it belongs to; ``medsegdiff infer --postprocessing_plan
<output>/models/postprocessing.json`` applies it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from .engine.handlers import latest_checkpoint
from .engine.launch import launch_training
from .engine.workflow import run_bundle
from .utils import read_json_object, write_json_atomic

__all__ = ["run_auto"]

logger = logging.getLogger(__name__)


def run_auto(
    datalist: str,
    dataroot: str | None = None,
    output: str = "auto_output",
    time_budget: float | None = None,
    gpu_memory_gb: float | None = None,
    gpus: int | None = None,
    label_threshold: float | None = None,
    max_epochs: int | None = None,
    fold: int = 0,
    evaluate: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Run the whole pipeline on a datalist; returns a summary (also written to ``output/auto_summary.json``).

    Args:
        datalist: MSD-style datalist (``training`` with ``fold`` keys).
        dataroot: folder the datalist's relative paths start from (default: the datalist's folder).
        output: working folder (the bundle root of the training run).
        time_budget: minutes of training; training stops after the first epoch past it (resumable).
        gpu_memory_gb: memory budget for planning (default: the GPU's memory, or 8 GB without a GPU).
        gpus: processes to train with (default: the plan's, i.e. the visible GPUs, 1 without).
        label_threshold: binarise 0/255 masks (e.g. 127 for Kvasir-SEG).
        max_epochs: epochs (default: the bundle's; with a time budget, effectively unlimited).
        fold: validation / evaluation fold.
        evaluate: evaluate the validation fold at the end.
        overrides: any other bundle key (e.g. ``channels=[16, 32, 64]`` for a quick run).
    """
    import torch

    from .planning.fingerprint import extract_fingerprint, load_fingerprint, save_fingerprint
    from .planning.planner import plan_dataset, save_plans

    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "auto_state.json"
    state = json.loads(state_path.read_text(encoding="utf-8")) if state_path.exists() else {}

    fp_path = out / "fingerprint.json"
    if fp_path.exists():
        logger.info(f"fingerprint: reusing {fp_path}")
        fingerprint = load_fingerprint(fp_path)
    else:
        fingerprint = extract_fingerprint(datalist, dataroot, label_threshold=label_threshold)
        save_fingerprint(fingerprint, out)

    plans_path, overrides_path = out / "plans.json", out / "bundle_overrides.json"
    if plans_path.exists() and overrides_path.exists():
        logger.info(f"plan: reusing {plans_path}")
        plans = json.loads(plans_path.read_text(encoding="utf-8"))
    else:
        if gpu_memory_gb is None:
            gpu_memory_gb = (torch.cuda.get_device_properties(0).total_memory / 2**30) if torch.cuda.is_available() else 8.0
        plans = plan_dataset(fingerprint, gpu_memory_gb=gpu_memory_gb, gpus=gpus)
        save_plans(plans, out)

    world_size = int(gpus if gpus is not None else plans["ddp"]["world_size"])
    run_overrides: dict[str, Any] = {"datalist": str(Path(datalist).resolve()), "fold": fold, **overrides}
    # relative datalist paths start at dataroot, or at the datalist's own folder (as load_datalist does)
    run_overrides["dataset_dir"] = str(Path(dataroot if dataroot is not None else Path(datalist).parent).resolve())
    if label_threshold is not None:
        run_overrides["label_threshold"] = label_threshold
    if time_budget is not None:
        run_overrides["time_budget_minutes"] = time_budget
        run_overrides.setdefault("max_epochs", max_epochs or 10_000)
    elif max_epochs is not None:
        run_overrides["max_epochs"] = max_epochs

    if not state.get("trained"):
        resume = latest_checkpoint(out / "models") is not None
        logger.info(f"training ({world_size} process(es)){', resuming' if resume else ''}")
        launch_training(out, overrides_path, world_size, resume=resume, synthetic_if_missing=False, **run_overrides)
        state["trained"] = True
        write_json_atomic(state_path, state)

    summary: dict[str, Any] = {"output": str(out), "plans": str(plans_path), "world_size": world_size}
    if evaluate:
        metrics_path = out / "eval" / "evaluation" / "metrics.csv"
        if not metrics_path.exists():
            plan_overrides = json.loads(overrides_path.read_text(encoding="utf-8"))
            keep = {k: v for k, v in {**plan_overrides, **run_overrides}.items()
                    if "#" not in k  # nested training-only ids do not exist in evaluate.json
                    and k not in ("max_epochs", "time_budget_minutes", "batch_size", "learning_rate", "resume")}
            run_bundle("evaluate", "infer", out, **keep)
        table = pd.read_csv(metrics_path)
        per_case = table.groupby("case")[["dice", "iou"]].mean()
        summary.update({"dice_mean": float(per_case["dice"].mean()), "iou_mean": float(per_case["iou"].mean()),
                        "hd95_mean": float(table["hd95"].mean()), "cases_evaluated": int(len(per_case)),
                        "metrics": str(metrics_path)})
        plan_path = metrics_path.with_name("postprocessing.json")
        if plan_path.is_file():  # an evaluation of an earlier version may have none
            plan = read_json_object(plan_path, "post-processing plan")
            model_plan = write_json_atomic(out / "models" / "postprocessing.json", plan)
            # the plan records the Dice of the cases that chose it, with it applied: these cases
            summary.update({"dice_mean_postprocessed": float(plan["scores"]["dice_after"]),
                            "postprocessing": {"steps": plan["steps"], "plan": str(model_plan)}})
    write_json_atomic(out / "auto_summary.json", summary)
    return summary
