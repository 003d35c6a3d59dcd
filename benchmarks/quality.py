#!/usr/bin/env python
"""Quality benchmark on Kvasir-SEG: MedSegDiff-V2 (through the bundle) vs a MONAI DynUNet (nnU-Net-like) baseline.

Both models train for the same wall-clock budget (``--minutes``; or the same number of epochs, ``--epochs``, where
the machine's speed varies between runs) on the same training cases (the validation fold left out of both) with the
same augmentation (``--augmentation``, default the bundle's: ``build_preprocessing(stage="train",
augmentation=...)``), and are scored on a FIXED held-out split at the images' ORIGINAL resolution (prediction
inverted from ``--size`` back to the input size) with the same metric code (``MetricsTableHandler`` ->
``case_metrics``: Dice, IoU, HD95 in pixels).

The split is ``benchmarks/splits/kvasir_seg_split.json``: sort the case ids present locally (image stems with a mask),
every 5th one (index % 5 == 0) is a test case, the rest train; of the training ids, every 20th (index % 20 == 0) is
the validation fold used only for the bundle's monitoring. The script recomputes the split from that rule and stops
if it differs from the file (``--write-split`` rewrites the file, e.g. for another local copy of the data).

Outputs (everything under ``--output``, default ``runs/quality``; rerunning skips what is done, and interrupted
training resumes from its last checkpoint with the rest of the budget):

* ``datalist_train.json`` (fold 0 = validation, fold 1 = training; no test case), ``datalist_test.json``;
* ``medsegdiff/`` (bundle root: ``models/``, ``eval/evaluation_mirror/metrics.csv``, the validation fold's
  ``eval/evaluation_mirror_validation/``; with ``--compare-ddpm`` also ``eval/ddpm_mirror/cases_<first>-<last>/``
  per part and ``eval/fast_first<N>_mirror/``), ``dynunet/`` (``model.pt``, ``mirror/metrics.csv``,
  ``validation/mirror/``) and ``ablation_<variant>/`` when asked for; with ``--no-mirror`` the folders without
  ``_mirror`` / ``mirror/``; every evaluation folder also holds ``postprocessing_candidates.csv`` and
  ``postprocessing.json`` (``MetricsTableHandler``);
* the result JSON, by default ``benchmarks/results/quality_<device>_<date>.json`` (``--smoke``: under ``--output``).

Each ``--ablations`` variant trains with the same budget and settings as the main model, which stands in for its own
variant (``usa+ssformer``) without retraining; with ``--anchor-weight select`` each variant chooses its own blend on
the validation fold, and with a blend every variant is also scored by its diffusion ensemble alone, since the switches
change what conditions the denoiser. Each is paired by case against the main model and against DynUNet.

Both models are scored with their FINAL weights after the budget (MedSegDiff: the EMA weights of the last
checkpoint), so the validation fold never selects a model, and both with test-time mirroring along both image axes
as the bundle infers (``--no-mirror``: without). What the validation fold can choose (``--postprocessing select``)
is nnU-Net's post-processing, for each model its own: whether keeping only the largest connected component raises
the fold's mean Dice. The test scores with that step are reported under ``postprocessing``, beside the plain ones,
which stay the headline so that runs before it compare.

Example::

    python benchmarks/quality.py --minutes 60 --compare-ddpm --ddpm-cases 10          # GPU
    python benchmarks/quality.py --minutes 30 --ablations none,sa,usa,usa+ssformer_nofilter,usa+ssformer
    python benchmarks/quality.py --minutes 10 --skip-medsegdiff                         # the baseline alone
    python benchmarks/quality.py --epochs 15 --lr-floor 1                               # equal iterations, constant lr
    python benchmarks/quality.py --minutes 10 --augmentation nnunet --output runs/quality_nnunet  # nnU-Net's DA
    python benchmarks/quality.py --minutes 10 --skip-baseline --condition-warmup 0.5 --output runs/quality_warmup
    python benchmarks/quality.py --smoke --output /tmp/quality_smoke                   # CPU, < 90 s

A command killed partway (e.g. at a 10-minute command limit) loses at most the epoch in progress: the same command
again resumes training from the last checkpoint with the budget less the time up to it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, str(_ROOT))

SPLIT_FILE = _ROOT / "benchmarks" / "splits" / "kvasir_seg_split.json"
DEFAULT_DATA = _ROOT.parent / "shared" / "data" / "Kvasir-SEG"
TEST_EVERY, VAL_EVERY = 5, 20
SPLIT_RULE = (
    "case ids = file stems of images/*.jpg that have masks/<id>.jpg, sorted (Python str order); "
    f"test = ids[i] for i % {TEST_EVERY} == 0; train = all other ids; "
    f"of the train ids (in the same order), train[j] for j % {VAL_EVERY} == 0 is the validation fold (fold 0) "
    "used only for monitoring during training"
)
LABEL_THRESHOLD = 127
NUM_CLASSES = 2
# what MetricsTableHandler writes beside metrics.csv: each case's Dice under the largest-component variants
CANDIDATES_CSV = "postprocessing_candidates.csv"
# the image axes that test-time mirroring flips (unless --no-mirror): both, as the training augmentation does
MIRROR_AXES = (0, 1)


# ------------------------------------------------------------------------------------------------------- split
def case_ids(data: Path) -> list[str]:
    return sorted(p.stem for p in (data / "images").glob("*.jpg") if (data / "masks" / p.name).is_file())


def compute_split(ids: list[str]) -> dict[str, list[str]]:
    ids = sorted(ids)
    test = [c for i, c in enumerate(ids) if i % TEST_EVERY == 0]
    train = [c for i, c in enumerate(ids) if i % TEST_EVERY != 0]
    val = [c for j, c in enumerate(train) if j % VAL_EVERY == 0]
    return {"test": test, "train": train, "validation": val}


def split_document(ids: list[str]) -> dict:
    split = compute_split(ids)
    return {
        "dataset": "Kvasir-SEG (the local copy in ../shared/data/Kvasir-SEG)",
        "rule": SPLIT_RULE,
        "test_every": TEST_EVERY,
        "validation_every": VAL_EVERY,
        "num_cases": len(ids),
        "num_test": len(split["test"]),
        "num_train": len(split["train"]),
        "num_validation": len(split["validation"]),
        "test_ids": split["test"],
    }


def load_checked_split(data: Path, write: bool = False) -> dict[str, list[str]]:
    """The split of the local cases; it must equal the committed ``kvasir_seg_split.json`` (unless ``write``)."""
    ids = case_ids(data)
    doc = split_document(ids)
    if write or not SPLIT_FILE.is_file():
        SPLIT_FILE.parent.mkdir(parents=True, exist_ok=True)
        SPLIT_FILE.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {SPLIT_FILE.relative_to(_ROOT)} ({doc['num_test']} test ids)")
    saved = json.loads(SPLIT_FILE.read_text(encoding="utf-8"))
    if saved.get("test_ids") != doc["test_ids"] or saved.get("rule") != SPLIT_RULE:
        sys.exit(
            f"error: the split rule applied to the {len(ids)} local cases in {data} does not give the test ids in "
            f"{SPLIT_FILE} ({saved.get('num_test')} ids there, {doc['num_test']} here). Use the same data copy, or "
            "--write-split to rewrite the file."
        )
    return compute_split(ids)


# ----------------------------------------------------------------------------------------------------- helpers
def device_slug(device) -> str:
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60] or "device"


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def write_json(path: Path, data: dict) -> None:
    from medsegdiff_bundle.utils import write_json_atomic

    write_json_atomic(path, data)


def read_json(path: Path) -> dict:
    from medsegdiff_bundle.utils import read_json_object

    return read_json_object(path, "state file") if path.is_file() else {}


def scores(summary: dict, *extra: str) -> dict:
    """Dice / IoU / HD95 (and ``extra`` keys) of a :func:`summarize` result."""
    return {k: summary[k] for k in ("dice", "iou", "hd95", *extra)}


def summarize(metrics_csv: Path) -> dict:
    """Mean over cases of Dice / IoU, mean HD95 over the cases where it is defined (both masks non-empty), and each
    case's Dice (``dice_per_case``, case id -> Dice, 5 decimals): kept in the result file so that runs of different
    sessions, whose per-case tables stay on their machines, can still be paired by case."""
    import pandas as pd

    table = pd.read_csv(metrics_csv)
    per_case = table.groupby("case")[["dice", "iou", "hd95"]].mean()
    return {
        "dice": float(per_case["dice"].mean()),
        "iou": float(per_case["iou"].mean()),
        "hd95": float(per_case["hd95"].mean()) if per_case["hd95"].notna().any() else float("nan"),
        "hd95_undefined_cases": int(per_case["hd95"].isna().sum()),
        "cases": int(len(per_case)),
        "metrics_csv": str(metrics_csv),
        "dice_per_case": {str(case): round(float(d), 5) for case, d in per_case["dice"].items()},
    }


def paired_difference(reference_csv: Path, other_csv: Path, metric: str = "dice") -> dict:
    """``other − reference`` per test case (each case's mean over classes), for two evaluations of the same cases
    (:func:`paired_stats`).

    Raises:
        SystemExit: the two evaluations scored different cases (the message names both files).
    """
    import pandas as pd

    ref, other = (pd.read_csv(f).groupby("case")[metric].mean() for f in (reference_csv, other_csv))
    return paired_stats(ref, other, metric, (str(reference_csv), str(other_csv)))


def paired_stats(reference, other, metric: str, names: tuple[str, str]) -> dict:
    """``other − reference`` per case: the mean, its standard error, the median and how many cases each side wins,
    so that a gap between two samplers, variants or runs can be read against the case-to-case spread.

    Args:
        reference, other: ``pandas.Series``, case id -> score, over the same cases.
        metric: the score's name, recorded in the result.
        names: where the two come from, for the error message.

    Raises:
        SystemExit: the two scored different cases.
    """
    if set(reference.index) != set(other.index):
        raise SystemExit(f"error: {names[0]} and {names[1]} scored different cases; cannot pair them.")
    diff = other - reference.loc[other.index]
    n = len(diff)
    return {"metric": metric, "cases": n, "mean": float(diff.mean()),
            "standard_error": float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
            "median": float(diff.median()), "cases_higher": int((diff > 0).sum()), "cases_lower": int((diff < 0).sum())}


def postprocessing_result(validation: dict, test: dict) -> dict:
    """nnU-Net's largest-component post-processing for one model: chosen on its evaluation of the validation fold,
    scored on its test evaluation from that evaluation's candidate table, so the test cases are not sampled again.

    Args:
        validation, test: :func:`summarize` results of the two evaluations (their ``metrics_csv`` sits beside the
            ``postprocessing_candidates.csv`` that ``MetricsTableHandler`` wrote).

    Returns:
        the plan's ``steps`` and, as ``validation``, its ``scores``
        (:func:`~medsegdiff_bundle.evaluation.select_postprocessing`), the test ``dice`` with the plan and its
        ``dice_per_case``, and ``minus_raw``: the per-case change on test.
    """
    import pandas as pd

    from medsegdiff_bundle.evaluation import dice_under_plan, select_postprocessing

    val_table, test_table = (pd.read_csv(Path(r["metrics_csv"]).with_name(CANDIDATES_CSV)) for r in (validation, test))
    plan = select_postprocessing(val_table)
    raw, processed = dice_under_plan(test_table, {"steps": []}), dice_under_plan(test_table, plan)
    return {"steps": plan["steps"], "validation": plan["scores"], "dice": float(processed.mean()),
            "dice_per_case": {str(c): round(float(d), 5) for c, d in processed.items()},
            "minus_raw": paired_stats(raw, processed, "dice", ("raw", "post-processed"))}


def write_datalists(out: Path, data: Path, train: list[str], val: list[str], test: list[str]) -> tuple[Path, Path]:
    def entry(cid: str, fold: int) -> dict:
        return {"image": str((data / "images" / f"{cid}.jpg").resolve()),
                "label": str((data / "masks" / f"{cid}.jpg").resolve()), "fold": fold}

    val_set = set(val)
    train_dl, test_dl = out / "datalist_train.json", out / "datalist_test.json"
    write_json(train_dl, {"description": "fold 0 = validation (monitoring), fold 1 = training; no test case",
                          "training": [entry(c, 0 if c in val_set else 1) for c in train]})
    write_json(test_dl, {"description": "held-out test cases (all fold 0 so evaluate.json's fold=0 takes them all)",
                         "training": [entry(c, 0) for c in test]})
    return train_dl, test_dl


# -------------------------------------------------------------------------------------------------- MedSegDiff
def variant_settings(variant: str) -> dict:
    """``usa+ssformer`` -> anchor/semantic bundle keys; ``none`` = neither; a missing part is ``none``."""
    from medsegdiff_bundle.networks.medsegdiff import ANCHOR_MODES, SEMANTIC_MODES

    anchor, semantic = "none", "none"
    for token in [t for t in variant.split("+") if t and t != "none"]:
        if token in ANCHOR_MODES:
            anchor = token
        elif token in SEMANTIC_MODES:
            semantic = token
        else:
            raise SystemExit(f"error: unknown ablation part {token!r} in {variant!r} "
                             f"(anchor: {ANCHOR_MODES}, semantic: {SEMANTIC_MODES}).")
    return {"anchor": anchor, "semantic": semantic}


# both models: cosine from the learning rate to --lr-floor times it over the budget, the time share updated at every
# epoch end (the bundle's ProgressCosineLR with its TimeBudgetHandler); part of both training stamps, so a folder
# trained with another schedule is not resumed with this one. The default follows the bundle's lr_floor: constant
# (at 885 CPU iterations on this split, seed 0, both models scored higher with it than annealed to 0.05, which
# bundles 0.5-0.7 and this script used before: quality_cpu-2c_2026-11-27.json, lr_schedule_comparison)
LR_FLOOR = 1.0


def training_budget(args) -> float | None:
    """Each model's wall-clock budget in minutes: ``--minutes``, or ``None`` when ``--epochs`` sets the length."""
    return None if args.epochs else args.minutes


def lr_schedule(floor: float, epochs: int | None = None) -> str:
    """The schedule's name in the training stamps (0.05's over a time budget is the one every stamp had before
    --lr-floor, so those folders resume with ``--lr-floor 0.05``)."""
    if floor == 1.0:
        return "constant"
    return f"cosine to {floor:g} over the {f'{epochs} epochs' if epochs else 'time budget'}"

# where the data lies and how it is loaded change nothing about the trained model (the GPU runs read a copy); nor
# does the precision, which both models of a run share (bf16 where the device computes it natively) and the result
# records: bf16 and fp32 scored one model alike (Dice 0.8425 against 0.8428, speed_cpu-2c_2026-11-27.json), so a
# model trained on a GPU is still scored on a CPU without bf16
_NOT_TRAINING_SETTINGS = ("dataset_dir", "datalist", "num_workers", "amp")
# settings that joined the stamps later, with the value every model stamped before them was trained with: a stamp
# without one reads as that value, so that those folders still resume and refuse another
_LATER_SETTINGS = {"augmentation": "default"}


def check_training_settings(root: Path, settings: dict) -> None:
    """Resume or reuse the model in ``root`` only if it was trained with ``settings`` (recorded in
    ``training.json`` on first use, budget included), so that a result is never reported under settings it was not
    trained with (e.g. a rerun with another ``--lr`` or ``--minutes`` into the same ``--output``).

    Raises:
        SystemExit: ``root`` holds a model trained with other settings; the message names them.
    """
    wanted = json.loads(json.dumps({k: v for k, v in settings.items() if k not in _NOT_TRAINING_SETTINGS},
                                   sort_keys=True))
    stamp = root / "training.json"
    if stamp.is_file():
        # stamps written before a key joined _NOT_TRAINING_SETTINGS may hold it
        recorded = {k: v for k, v in read_json(stamp).items() if k not in _NOT_TRAINING_SETTINGS}
        recorded = {**{k: v for k, v in _LATER_SETTINGS.items() if k in wanted}, **recorded}
        changed = {k: {"trained with": recorded.get(k), "asked for": wanted.get(k)}
                   for k in sorted(set(recorded) | set(wanted)) if recorded.get(k) != wanted.get(k)}
        if changed:
            raise SystemExit(f"error: {root} holds a model trained with other settings {changed}; pass another "
                             "--output (or remove that folder) to train with these.")
        return
    root.mkdir(parents=True, exist_ok=True)
    write_json(stamp, wanted)


def train_medsegdiff(root: Path, minutes: float | None, settings: dict, train_extra: dict,
                     lr_floor: float = LR_FLOOR) -> float:
    """Bundle training with a wall-clock budget (``None``: none, ``train_extra["max_epochs"]`` ends it) and the
    learning rate annealed to ``lr_floor`` times its start (the bundle's ``lr_floor``); resumable with the same
    settings (see :func:`check_training_settings`). Returns the training minutes used (all sessions)."""
    from medsegdiff_bundle.engine.handlers import latest_checkpoint
    from medsegdiff_bundle.engine.workflow import run_bundle

    epochs = None if minutes is not None else train_extra.get("max_epochs")
    check_training_settings(root, {**settings, **train_extra, "minutes": minutes,
                                   "lr_schedule": lr_schedule(lr_floor, epochs)})
    state_path = root / "train_state.json"
    state = read_json(state_path)
    if state.get("done"):
        return float(state["elapsed_min"])
    elapsed = float(state.get("elapsed_min", 0.0))
    ckpt = latest_checkpoint(root / "models")
    if ckpt and state.get("segment_start"):  # an interrupted session: count its time up to its last checkpoint
        elapsed += max(0.0, (os.path.getmtime(ckpt) - state["segment_start"]) / 60.0)
    remaining = None if minutes is None else minutes - elapsed
    if remaining is None or remaining > 0 or ckpt is None:
        write_json(state_path, {"elapsed_min": elapsed, "segment_start": time.time(), "done": False})
        start = time.monotonic()
        # the whole budget: the checkpoint carries the training time used (TimeBudgetHandler), and a learning rate
        # with lr_floor < 1 anneals over the whole budget
        run_bundle("train", "train", root, resume=ckpt is not None, time_budget_minutes=minutes, **settings,
                   **train_extra, lr_floor=lr_floor)
        elapsed += (time.monotonic() - start) / 60.0
    write_json(state_path, {"elapsed_min": elapsed, "done": True})
    return elapsed


def ema_state_dict(root: Path) -> dict:
    """The EMA weights of the newest training checkpoint in ``root/models`` as a plain state dict (read only)."""
    import torch

    from medsegdiff_bundle.engine.handlers import latest_checkpoint

    ckpt = latest_checkpoint(root / "models")
    if ckpt is None:
        raise SystemExit(f"error: no training checkpoint in {root / 'models'}")
    ema = torch.load(ckpt, map_location="cpu", weights_only=True)["ema"]
    return {k[len("module."):]: v for k, v in ema.items() if k.startswith("module.")}


def final_ema_weights(root: Path) -> Path:
    """``root/models/final_ema.pt`` (what evaluate.json loads), written from :func:`ema_state_dict` when missing."""
    from medsegdiff_bundle.engine import atomic_save

    path = root / "models" / "final_ema.pt"
    if not path.is_file():
        atomic_save(ema_state_dict(root), path)
    return path


# switches that change how fast a sampler runs, not what it computes: a finished evaluation serves either way
_SPEED_ONLY = ("compile", "compile_mode")


def training_progress(root: Path) -> tuple[int | None, int | None]:
    """``(iterations, epochs)`` the bundle trained in ``root``, from the last row of ``eval/training_log.csv``
    (columns ``iteration, epoch, ...``); ``(None, None)`` before the first iteration."""
    log = root / "eval" / "training_log.csv"
    rows = log.read_text(encoding="utf-8").split() if log.is_file() else []
    if len(rows) < 2:
        return None, None
    iteration, epoch = rows[-1].split(",")[:2]
    return int(iteration), int(epoch)


def loop_timing(root: Path) -> dict | None:
    """The bundle's training loop in ``root`` from ``eval/loop_timing.csv`` (:class:`LoopTimingHandler`): images per
    second and the share of the time spent waiting for the loader, over the epochs after the first (which includes
    the workers' start and, under ``compile``, the compilation); ``None`` without the file.

    A run with a condition warm-up (its ``eval/training_log.csv`` rows without a ``diffusion_loss``) also gets its
    warm-up iterations and the images per second of its steady warm-up and joint epochs apart (the epoch of the
    switch, which holds both, in neither)."""
    import pandas as pd

    path = root / "eval" / "loop_timing.csv"
    if not path.is_file():
        return None
    log = pd.read_csv(path)
    steady = log[log["epoch"] > log["epoch"].min()] if len(log) > 1 else log

    def images_per_s(epochs: pd.DataFrame) -> float:
        seconds = float(epochs["seconds"].sum())
        return float(epochs["images"].sum()) / seconds if seconds > 0 else float("nan")

    seconds = float(steady["seconds"].sum())
    out = {"epochs": int(len(log)), "steady_epochs": int(len(steady)), "images_per_s": images_per_s(steady),
           "data_wait_fraction": float(steady["data_wait_seconds"].sum()) / seconds if seconds > 0 else float("nan"),
           "first_epoch_s": float(log["seconds"].iloc[0])}
    iterations = root / "eval" / "training_log.csv"
    if iterations.is_file():
        rows = pd.read_csv(iterations)
        warm = rows["diffusion_loss"].isna() if "diffusion_loss" in rows else pd.Series(True, index=rows.index)
        if warm.any():
            by_epoch = warm.groupby(rows["epoch"]).agg(["all", "any"])
            warm_epochs, joint_epochs = by_epoch.index[by_epoch["all"]], by_epoch.index[~by_epoch["any"]]
            out.update({"condition_warmup_iterations": int(warm.sum()),
                        "warmup_images_per_s": images_per_s(steady[steady["epoch"].isin(warm_epochs)]),
                        "joint_images_per_s": images_per_s(steady[steady["epoch"].isin(joint_epochs)])})
    return out


def evaluate_medsegdiff(root: Path, test_dl: Path, settings: dict, eval_extra: dict, name: str = "evaluation") -> dict:
    """Score the final EMA weights with the bundle's ``evaluate.json`` into ``eval/<name>``. A finished evaluation is
    reused only if its recorded sampler settings (``sampling.json``) equal ``eval_extra``'s (speed switches aside);
    otherwise, e.g. after ``--steps`` changed, it is run again, so a result never carries another setting's label."""
    from medsegdiff_bundle.engine.workflow import run_bundle

    out_dir = root / "eval" / name
    metrics, stamp = out_dir / "metrics.csv", out_dir / "sampling.json"
    wanted = {k: v for k, v in sorted(eval_extra.items()) if k not in _SPEED_ONLY}
    unmirrored = {"mirror_axes": []}  # what an evaluation recorded before test-time mirroring existed did
    # an evaluation finished before the candidate table existed is run again for it (post-processing needs it)
    done = metrics.is_file() and (out_dir / CANDIDATES_CSV).is_file() and stamp.is_file()
    if not (done and {**unmirrored, **read_json(stamp)} == {**unmirrored, **wanted}):
        metrics.unlink(missing_ok=True)
        run_bundle("evaluate", "infer", root, datalist=str(test_dl), fold=0, ckpt_path=str(final_ema_weights(root)),
                   output_dir=str(out_dir), save_overlay=False, **settings, **eval_extra)
        write_json(stamp, wanted)
    return summarize(metrics)


def evaluate_medsegdiff_in_parts(root: Path, test_dl: Path, n: int, part: int, settings: dict, eval_extra: dict,
                                 name: str) -> dict:
    """:func:`evaluate_medsegdiff` of the first ``n`` cases of ``test_dl`` in parts of ``part`` cases, each cached in
    ``eval/<name>/cases_<first>-<last>`` (positions in ``test_dl``), the per-case tables joined into
    ``eval/<name>/metrics.csv``.

    For slow evaluations (DDPM-1000 takes minutes per case on a CPU): an interrupted run keeps its finished parts, and
    a larger ``n`` later only evaluates the new ones. The sampler seeds its generator per image, so a case's result
    does not depend on the part it was sampled in.
    """
    import pandas as pd

    cases = read_json(test_dl)["training"][:n]
    tables = []
    for first in range(0, len(cases), part):
        last = min(first + part, len(cases)) - 1
        part_dl = test_dl.with_name(f"{test_dl.stem}_cases_{first}-{last}.json")
        write_json(part_dl, {"training": cases[first:last + 1]})
        done = evaluate_medsegdiff(root, part_dl, settings, eval_extra, f"{name}/cases_{first}-{last}")
        tables.append(pd.read_csv(done["metrics_csv"]))
    joined = root / "eval" / name / "metrics.csv"
    pd.concat(tables, ignore_index=True).to_csv(joined, index=False)
    return summarize(joined)


# anchor_weight 1 replaces the sample by the condition UNet's anchor, so one member of one step is enough
_ANCHOR_ONLY = {"sampler": "ddim", "steps": 1, "ensemble": 1, "round_x0": False, "anchor_weight": 1.0}


def evaluate_anchor(root: Path, test_dl: Path, settings: dict, mirror: bool) -> dict:
    """The condition UNet's own segmentation (the anchor) scored like the samples, into ``eval/anchor_only``: what
    the conditioning model reaches by itself, apart from what the denoiser makes of it. With ``mirror`` it is the
    mean over the four mirrored views (one member per view), into ``eval/anchor_only_mirror``."""
    if not mirror:
        return evaluate_medsegdiff(root, test_dl, settings, _ANCHOR_ONLY, "anchor_only")
    views = {"ensemble": 2 ** len(MIRROR_AXES), "mirror_axes": list(MIRROR_AXES)}
    return evaluate_medsegdiff(root, test_dl, settings, {**_ANCHOR_ONLY, **views}, "anchor_only_mirror")


def trained_network_and_cases(root: Path, data: Path, ids: list[str], args, variant: dict, device):
    """The trained MedSegDiff-V2 (EMA weights, eval mode) and ``ids`` pre-processed at the training size, as one
    batch: ``(network, image (B, 3, size, size), label (B, 1, size, size))``."""
    import torch
    from monai.data import DataLoader, Dataset

    from medsegdiff_bundle.data.transforms import build_preprocessing
    from medsegdiff_bundle.networks import MedSegDiffV2

    cases = [{"image": str(data / "images" / f"{c}.jpg"), "label": str(data / "masks" / f"{c}.jpg")} for c in ids]
    transform = build_preprocessing(2, "validate", [args.size] * 2, 2, label_threshold=LABEL_THRESHOLD)
    batch = next(iter(DataLoader(Dataset(cases, transform), batch_size=len(cases))))
    network = MedSegDiffV2(2, 3, 2, args.channels, condition_channels=args.condition_channels,
                           condition_backbone=args.condition_backbone, **variant)
    network.load_state_dict(torch.load(final_ema_weights(root), map_location="cpu", weights_only=True))
    network.to(device).eval()
    image, label = (torch.as_tensor(batch[k]).to(device) for k in ("image", "label"))
    return network, image, label


def evaluation_sampler(args):
    """The ``DiffusionSampler`` of the MedSegDiff test evaluation (``--sampler/--steps/--ensemble/--round-x0``, and
    the test-time mirroring unless ``--no-mirror``), for the in-memory diagnostics and the anchor-weight selection."""
    from medsegdiff_bundle.diffusion.sampler import DiffusionSampler

    return DiffusionSampler(args.sampler, args.steps, args.ensemble, seed=args.seed, round_x0=args.round_x0,
                            mirror_axes=MIRROR_AXES if args.mirror else None)


def sampler_trajectory(root: Path, data: Path, test_ids: list[str], args, variant: dict, device) -> dict:
    """Dice of the predicted mask after every sampler step on the first ``--trajectory`` test cases, at the
    training size, next to the anchor's Dice (written to ``<root>/eval/trajectory.csv|png``)."""
    from medsegdiff_bundle.evaluation import denoising_trajectory, save_trajectory_plot

    network, image, label = trained_network_and_cases(root, data, test_ids[: args.trajectory], args, variant, device)
    table, summary = denoising_trajectory(network, evaluation_sampler(args), image, label)
    out_dir = root / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "trajectory.csv", index=False)
    save_trajectory_plot(out_dir / "trajectory.png", table, summary)
    return {"cases": len(image), "size": args.size, **summary, "dice_per_step": [round(float(d), 4) for d in table["dice"]]}


def select_anchor_weight(root: Path, data: Path, val_ids: list[str], args, variant: dict, device) -> dict:
    """Choose ``anchor_weight`` on the validation fold (never on test): one sampling run at the training size, every
    blend of :data:`DEFAULT_ANCHOR_WEIGHTS` scored, with the test evaluation's mirroring; the table goes to
    ``<root>/eval/anchor_weight_sweep_mirror.csv`` (``--no-mirror``: ``anchor_weight_sweep.csv``).
    Resumable: a finished sweep is read back."""
    import pandas as pd

    from medsegdiff_bundle.evaluation import anchor_weight_sweep, best_anchor_weight

    csv = root / "eval" / f"anchor_weight_sweep{'_mirror' if args.mirror else ''}.csv"
    if csv.is_file():
        table = pd.read_csv(csv)
        best = best_anchor_weight(table)
    else:
        network, image, label = trained_network_and_cases(root, data, val_ids, args, variant, device)
        table, best = anchor_weight_sweep(network, evaluation_sampler(args), image, label)
        csv.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(csv, index=False)
    return {"selected_on": f"validation fold ({len(val_ids)} cases, at {args.size}x{args.size})",
            "anchor_weight": best, "validation_dice": {str(w): round(float(d), 4)
                                                       for w, d in zip(table["anchor_weight"], table["dice"])}}


# ----------------------------------------------------------------------------------------------------- DynUNet
def dynunet_topology(size: int, filters_max: int, filters_base: int) -> dict:
    """nnU-Net-like 2D topology: 3x3 kernels, first stride 1, then stride 2 while the map stays >= 8 px (>= 4 px
    for small inputs), at most 5 down-samplings; filters double from ``filters_base`` up to ``filters_max``."""
    strides, s = [1], size
    while len(strides) < 6 and s // 2 >= (8 if size >= 128 else 4):
        strides.append(2)
        s //= 2
    filters = [min(filters_base * 2**i, filters_max) for i in range(len(strides))]
    return {"kernel_size": [[3, 3]] * len(strides), "strides": [[st, st] for st in strides],
            "upsample_kernel_size": [[st, st] for st in strides[1:]], "filters": filters}


def make_dynunet(topology: dict):
    from monai.networks.nets import DynUNet

    return DynUNet(spatial_dims=2, in_channels=3, out_channels=NUM_CLASSES, kernel_size=topology["kernel_size"],
                   strides=topology["strides"], upsample_kernel_size=topology["upsample_kernel_size"],
                   filters=topology["filters"], norm_name="instance", deep_supervision=False, res_block=False)


def train_dynunet(root: Path, train_cases: list[dict], args, topology: dict, device, amp: bool) -> float:
    """Plain training loop (DiceCELoss, AdamW, bf16 autocast with ``amp``, as MedSegDiff-V2 in the same run), budget
    checked after each epoch like the bundle's ``TimeBudgetHandler`` (or ``--epochs`` epochs, the learning rate
    annealed over them); checkpoint every epoch, resumable. Returns training minutes used."""
    import torch
    from monai.data import DataLoader
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism
    from torch.utils.data import RandomSampler

    from medsegdiff_bundle.data import build_dataset
    from medsegdiff_bundle.data.transforms import build_preprocessing
    from medsegdiff_bundle.engine import atomic_save, cosine_annealed, samples_per_epoch

    # "epochs" joins the stamp only when set, so that folders trained before --epochs existed still resume
    check_training_settings(root, {"minutes": training_budget(args), "size": args.size, "batch_size": args.batch_size,
                                   "iterations_per_epoch": args.iterations_per_epoch, "lr": args.baseline_lr,
                                   "seed": args.seed, "topology": topology, "num_cases": len(train_cases),
                                   "lr_schedule": lr_schedule(args.lr_floor, args.epochs),
                                   "augmentation": args.augmentation,
                                   **({"epochs": args.epochs} if args.epochs else {})})
    final, ckpt_path = root / "model.pt", root / "checkpoint.pt"
    state = read_json(root / "train_state.json")
    if final.is_file() and state.get("done"):
        return float(state["elapsed_min"])
    set_determinism(seed=args.seed)
    net = make_dynunet(topology).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=args.baseline_lr, weight_decay=1e-4)
    epoch, elapsed = 0, 0.0
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        epoch, elapsed = int(ck["epoch"]), float(ck["elapsed_min"])
    pre = build_preprocessing(2, "train", [args.size, args.size], NUM_CLASSES, "rgb", label_threshold=LABEL_THRESHOLD,
                              augmentation=args.augmentation)
    dataset = build_dataset(train_cases, pre, "memory", num_workers=args.num_workers)
    # the bundle's dataset (2D: loaded and resized cases cached in memory, built before the clock starts, as the
    # bundle builds its own) and loader: the same epoch definition (--iterations-per-epoch), pinned batches copied
    # without blocking
    sampler = RandomSampler(dataset, num_samples=samples_per_epoch(args.iterations_per_epoch, args.batch_size))
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda", drop_last=False)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    start = time.monotonic() - elapsed * 60.0
    while (epoch < args.epochs) if args.epochs else (elapsed < args.minutes):
        net.train()
        # the bundle's schedule: the share of the epochs or of the time budget as of the last epoch end
        progress = epoch / args.epochs if args.epochs else elapsed / args.minutes
        for group in opt.param_groups:
            group["lr"] = cosine_annealed(args.baseline_lr, args.lr_floor * args.baseline_lr, progress)
        pre.set_random_state(seed=args.seed + epoch)  # per-epoch augmentation seed, like the bundle's EpochSeedHandler
        torch.manual_seed(args.seed + epoch)
        for batch in loader:
            image, label = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = net(image)
            loss = loss_fn(logits.float(), label)
            loss.backward()
            opt.step()
        epoch += 1
        elapsed = (time.monotonic() - start) / 60.0
        # atomic: a command killed at its time limit (the GPU sessions' way of splitting a budget) resumes from here
        atomic_save({"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                     "elapsed_min": elapsed}, ckpt_path)
        print(f"dynunet epoch {epoch}: loss {float(loss.detach()):.4f}, {elapsed:.2f} min", flush=True)
    atomic_save(net.state_dict(), final)
    write_json(root / "train_state.json", {"elapsed_min": elapsed, "epochs": epoch, "iterations": epoch * len(loader),
                                           "done": True})
    return elapsed


def evaluate_dynunet(root: Path, test_cases: list[dict], args, topology: dict, device, folder: str = "") -> dict:
    """Predict at ``--size`` (the mean logits over the four mirrorings, into ``root/<folder>/mirror``; with
    ``--no-mirror`` the plain prediction, into ``root/<folder>``), invert the probabilities to the original size
    exactly as the bundle does (``Invertd`` on the evaluate pre-processing), argmax, and score with
    ``MetricsTableHandler`` (which also writes the post-processing candidates)."""
    import torch
    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedEvaluator
    from monai.inferers import SimpleInferer
    from monai.transforms import Activationsd, AsDiscreted, Compose, Invertd

    from medsegdiff_bundle.data.transforms import build_preprocessing
    from medsegdiff_bundle.diffusion.mirroring import mirrored_mean
    from medsegdiff_bundle.engine.handlers import MetricsTableHandler

    class MirroredInferer(SimpleInferer):
        def __call__(self, inputs, network, *args, **kwargs):
            return mirrored_mean(lambda x: network(x, *args, **kwargs), inputs, MIRROR_AXES)

    out_dir = root / folder / "mirror" if args.mirror else root / folder
    metrics = out_dir / "metrics.csv"
    if not (metrics.is_file() and (out_dir / CANDIDATES_CSV).is_file()):
        net = make_dynunet(topology).to(device)
        net.load_state_dict(torch.load(root / "model.pt", map_location=device, weights_only=True))
        net.eval()
        pre = build_preprocessing(2, "evaluate", [args.size, args.size], NUM_CLASSES, "rgb",
                                  label_threshold=LABEL_THRESHOLD)
        post = Compose([
            Activationsd("pred", softmax=True),
            Invertd(["pred"], transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
            AsDiscreted("pred", argmax=True),
        ])
        loader = DataLoader(Dataset(test_cases, transform=pre), batch_size=1, shuffle=False,
                            num_workers=args.num_workers)
        inferer = MirroredInferer() if args.mirror else SimpleInferer()
        evaluator = SupervisedEvaluator(device=device, val_data_loader=loader, network=net, inferer=inferer,
                                        postprocessing=post, amp=False,
                                        val_handlers=[MetricsTableHandler(out_dir, NUM_CLASSES)])
        evaluator.run()
    return summarize(metrics)


# -------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    from medsegdiff_bundle.data.transforms import AUGMENTATIONS
    from medsegdiff_bundle.engine.fastpath import COMPILE_MODES
    from medsegdiff_bundle.networks import CONDITION_BACKBONES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="Kvasir-SEG folder (images/*.jpg, masks/*.jpg)")
    p.add_argument("--output", default="runs/quality", help="folder for all runs (resumable)")
    p.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/quality_<device>_<date>.json, "
                   "or _2, _3, ... if taken; with --smoke: <output>/quality_<device>_<date>.json)")
    p.add_argument("--minutes", type=float, default=60.0, help="training wall-clock budget per model")
    p.add_argument("--epochs", type=int, default=None,
                   help="train each model for this many epochs instead of --minutes (an annealed rate anneals over "
                        "them): a comparison at equal iterations, which does not depend on how fast the machine runs "
                        "that hour")
    p.add_argument("--size", type=int, default=256, help="patch size (images are resized to size x size)")
    p.add_argument("--batch-size", type=int, default=8, help="both models")
    p.add_argument("--augmentation", choices=AUGMENTATIONS, default="default",
                   help="training augmentation of both models (the bundle's augmentation option; nnunet: nnU-Net v2's "
                        "default one)")
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--iterations-per-epoch", type=int, default=None,
                   help="fixed-length epochs for both models (the bundle's iterations_per_epoch; default one pass)")
    p.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128, 256], help="MedSegDiff-V2 widths")
    p.add_argument("--condition-channels", type=int, nargs="+", default=None,
                   help="MedSegDiff-V2 condition-UNet widths (default: --channels)")
    p.add_argument("--condition-backbone", choices=CONDITION_BACKBONES, default="plain",
                   help="MedSegDiff-V2 condition UNet (MedSegDiffV2 condition_backbone; residual: bundle < 0.4.0)")
    p.add_argument("--sampler", default="dpmpp", help="MedSegDiff sampler for the test evaluation")
    p.add_argument("--steps", type=int, default=20, help="sampler steps")
    p.add_argument("--ensemble", type=int, default=5, help="ensemble members per image")
    p.add_argument("--round-x0", action="store_true",
                   help="sampler steps continue from the most probable clean mask (DiffusionSampler round_x0)")
    p.add_argument("--anchor-weight", default="0",
                   help="weight in [0, 1] of the condition model's segmentation blended into the MedSegDiff ensemble "
                        "(DiffusionSampler anchor_weight), or 'select' to choose it on the validation fold")
    p.add_argument("--no-mirror", dest="mirror", action="store_false",
                   help="no test-time mirroring. By default both models mirror along both image axes, as the "
                        "bundle's inference does: MedSegDiff-V2's ensemble members see mirrored views "
                        "(DiffusionSegInferer mirror_axes), DynUNet averages its logits over the four mirrorings (as "
                        "nnU-Net predicts). Each setting is evaluated into folders of its own ('_mirror' when on)")
    p.add_argument("--postprocessing", choices=("none", "select"), default="none",
                   help="select: each model also predicts the validation fold, which chooses nnU-Net's largest-"
                        "connected-component step for it (medsegdiff_bundle.evaluation.select_postprocessing); its "
                        "test Dice with that step is reported beside the plain one (result key postprocessing). Off "
                        "by default: on Kvasir-SEG the step lowered the test Dice of the models measured so far "
                        "(benchmarks/FINDINGS.md), and the validation predictions cost device time")
    p.add_argument("--val-interval", type=int, default=10, help="bundle validation interval (epochs)")
    p.add_argument("--lr", type=float, default=1e-4, help="MedSegDiff-V2 AdamW learning rate (the bundle's default)")
    p.add_argument("--lr-floor", type=float, default=LR_FLOOR,
                   help="both models' learning rate anneals (cosine over the time budget) to this fraction of its "
                        "start (the bundle's lr_floor); 1: constant")
    p.add_argument("--timestep-power", type=float, default=None,
                   help="MedSegDiff-V2 training timestep density ~ t^(p-1) (default: the bundle's timestep_power)")
    p.add_argument("--x0-dice-weight", type=float, default=None,
                   help="MedSegDiff-V2 weight of the soft Dice on the predicted x0 (MedSegDiffLoss x0_dice_weight; "
                        "default: the bundle's)")
    p.add_argument("--condition-warmup", type=float, default=None, metavar="F",
                   help="MedSegDiff-V2: train the condition UNet alone for the first share F of the budget (the "
                        "bundle's condition_warmup; default: the bundle's, 0)")
    p.add_argument("--baseline-lr", type=float, default=1e-3,
                   help="DynUNet AdamW learning rate (on MedSegDiff-V2's schedule, --lr-floor)")
    p.add_argument("--baseline-filters", type=int, nargs=2, default=[32, 320], metavar=("BASE", "MAX"),
                   help="DynUNet filters: first level and cap")
    p.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                   help="sample the MedSegDiff evaluations with the compiled denoiser in this mode (e.g. "
                        "reduce-overhead: CUDA graphs, ~8x faster per step on an H200); default eager")
    p.add_argument("--compare-ddpm", action="store_true", help="also sample the MedSegDiff model with DDPM-1000")
    p.add_argument("--ddpm-cases", type=int, default=10, help="first N test cases for --compare-ddpm")
    p.add_argument("--ddpm-part", type=int, default=10, metavar="K",
                   help="--compare-ddpm samples DDPM-1000 in parts of K cases, each kept when done: an interrupted "
                        "run resumes at its last part, and a larger --ddpm-cases only adds parts; each part loads "
                        "(and with --compile-mode compiles) the model anew")
    p.add_argument("--trajectory", type=int, default=0, metavar="N",
                   help="Dice after every sampler step on the first N test cases (at --size), next to the anchor's")
    p.add_argument("--ablations", default="", help="comma-separated variants, e.g. none,sa,usa,usa+ssformer")
    p.add_argument("--ablation-budget", choices=("time", "epochs"), default="time",
                   help="each ablation variant trains for --minutes (time), or for as many epochs as the main model "
                        "did, without a time limit (epochs: the same number of iterations, into "
                        "ablation_<variant>_equal_epochs/ and the result key ablations_equal_epochs)")
    p.add_argument("--skip-baseline", action="store_true", help="train and score MedSegDiff-V2 alone")
    p.add_argument("--skip-medsegdiff", action="store_true",
                   help="train and score the DynUNet baseline alone (e.g. in a GPU session of its own at a budget that "
                        "does not fit both models)")
    p.add_argument("--write-split", action="store_true", help="rewrite benchmarks/splits/kvasir_seg_split.json")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="training and sampling precision of both models; auto: bf16 autocast where the device computes "
                        "it natively (bf16_is_fast), else fp32 (--smoke: fp32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true",
                   help="CPU smoke test: 12 train + 4 test cases, 64^2, tiny widths, 0.05 min, steps 2, ensemble 2")
    args = p.parse_args(argv)
    if args.anchor_weight != "select":
        try:
            weight = float(args.anchor_weight)
        except ValueError:
            weight = -1.0
        if not 0.0 <= weight <= 1.0:
            p.error(f"--anchor-weight must be a number in [0, 1] or 'select', got {args.anchor_weight!r}")
    if args.skip_medsegdiff:
        if args.skip_baseline:
            p.error("--skip-medsegdiff and --skip-baseline leave nothing to train")
        blend = args.anchor_weight == "select" or float(args.anchor_weight) > 0
        needs_msd = {"--compare-ddpm": args.compare_ddpm, "--trajectory": args.trajectory > 0,
                     "--ablations": bool(args.ablations.strip()), "--anchor-weight": blend}
        asked = [name for name, used in needs_msd.items() if used]
        if asked:
            p.error(f"{', '.join(asked)} need(s) the MedSegDiff-V2 model, which --skip-medsegdiff leaves out")
    if args.epochs is not None and args.epochs < 1:
        p.error(f"--epochs must be >= 1, got {args.epochs}")
    if not 0.0 <= args.lr_floor <= 1.0:
        p.error(f"--lr-floor must be in [0, 1] (a fraction of the start rate), got {args.lr_floor}")
    if args.ddpm_cases < 1 or args.ddpm_part < 1:
        p.error(f"--ddpm-cases and --ddpm-part must be >= 1, got {args.ddpm_cases} and {args.ddpm_part}")
    if args.smoke:
        args.minutes, args.size, args.channels, args.steps, args.ensemble = 0.05, 64, [8, 16, 32], 2, 2
        args.batch_size, args.num_workers, args.val_interval, args.baseline_filters = 4, 0, 1, [8, 32]
        args.ddpm_cases = min(args.ddpm_cases, 1)
    return args


def uses_bf16(args, device) -> bool:
    """Whether both models train and sample under bf16 autocast: ``--precision``, where ``auto`` is bf16 on a device
    that computes it natively (``bf16_is_fast``) and fp32 elsewhere and in ``--smoke``."""
    from medsegdiff_bundle.engine.fastpath import bf16_is_fast

    if args.precision == "auto":
        return bf16_is_fast(device) and not args.smoke
    return args.precision == "bf16"


def main(argv=None) -> int:
    args = parse_args(argv)
    data = Path(args.data)
    if not data.is_absolute():
        data = (_ROOT / data) if (_ROOT / data).exists() else data.resolve()
    if not (data / "images").is_dir() or not (data / "masks").is_dir():
        print(f"Kvasir-SEG not found at {data} (needs images/*.jpg and masks/*.jpg): skipping the quality benchmark.")
        return 0
    split = load_checked_split(data, write=args.write_split)

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_ids, val_ids, test_ids = split["train"], split["validation"], split["test"]
    if args.smoke:
        train_ids, test_ids = train_ids[:12], test_ids[:4]
        val_ids = train_ids[:2]
    assert not set(test_ids) & set(train_ids), "test and training cases overlap"
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    train_dl, test_dl = write_datalists(out, data, train_ids, val_ids, test_ids)

    common = {"dataset_dir": str(data.resolve()), "label_threshold": LABEL_THRESHOLD, "patch_size": [args.size] * 2,
              "channels": list(args.channels), "num_workers": args.num_workers, "seed": args.seed,
              "condition_channels": list(args.condition_channels) if args.condition_channels else None,
              "condition_backbone": args.condition_backbone}
    train_extra = {"datalist": str(train_dl), "fold": 0, "max_epochs": args.epochs or 100_000,
                   "batch_size": args.batch_size, "augmentation": args.augmentation,
                   "learning_rate": args.lr, "iterations_per_epoch": args.iterations_per_epoch,
                   **({"timestep_power": args.timestep_power} if args.timestep_power is not None else {}),
                   **({"x0_dice_weight": args.x0_dice_weight} if args.x0_dice_weight is not None else {}),
                   **({"condition_warmup": args.condition_warmup} if args.condition_warmup is not None else {}),
                   "val_interval": args.val_interval, "val_steps": 10 if not args.smoke else 2,
                   "synthetic_if_missing": False}
    eval_extra = {"sampler": args.sampler, "steps": args.steps, "ensemble": args.ensemble, "round_x0": args.round_x0}
    mirroring = {"mirror_axes": list(MIRROR_AXES) if args.mirror else []}
    eval_extra.update(mirroring)
    # the sampling speed switch of the MedSegDiff evaluations (the same probabilities up to rounding; a finished
    # evaluation folder is reused whichever way it was computed)
    compiled = {"compile": True, "compile_mode": args.compile_mode} if args.compile_mode else {}
    eval_extra.update(compiled)
    # one precision for both models, training and sampling
    common["amp"] = uses_bf16(args, device)

    t0 = time.monotonic()
    result: dict = {
        "benchmark": "quality",
        "dataset": "Kvasir-SEG",
        "device": device_name(device),
        "device_type": device.type,
        "date": _dt.date.today().isoformat(),
        "torch_version": torch.__version__,
        "smoke": bool(args.smoke),
        "split": {"rule": SPLIT_RULE, "file": str(SPLIT_FILE.relative_to(_ROOT)), "num_train": len(train_ids),
                  "num_validation": len(val_ids), "num_test": len(test_ids)},
        "size": args.size,
        "augmentation": args.augmentation,
        "condition_warmup": args.condition_warmup or 0.0,
        "train_minutes_budget": training_budget(args),
        "train_epochs": args.epochs,
        "sampler": args.sampler,
        "steps": args.steps,
        "ensemble": args.ensemble,
        "round_x0": bool(args.round_x0),
        "mirror_axes": list(MIRROR_AXES) if args.mirror else [],
        "amp_bf16": common["amp"],
        "anchor_weight": None if args.anchor_weight == "select" else float(args.anchor_weight),
        "settings": {k: v for k, v in vars(args).items()},
    }

    if args.out:
        out_json = Path(args.out)
    elif args.smoke:
        out_json = out / f"quality_{device_slug(device)}_{result['date']}.json"
    else:
        from medsegdiff_bundle.utils import unused_path

        # a second run on the same day must not replace the committed results of the first
        name = f"quality_{device_slug(device)}_{result['date']}.json"
        out_json = unused_path(_ROOT / "benchmarks" / "results" / name)

    # (a) MedSegDiff-V2 through the bundle
    main_variant = {"anchor": "usa", "semantic": "ssformer"}
    msd_root = out / "medsegdiff"
    msd, msd_minutes = None, None
    # evaluation folders are named by the sampler settings that change the result
    sampling_tag = ("_round_x0" if args.round_x0 else "") + ("_mirror" if args.mirror else "")
    blended = ""
    if not args.skip_medsegdiff:
        msd_minutes = train_medsegdiff(msd_root, training_budget(args), {**common, **main_variant}, train_extra,
                                       args.lr_floor)
        if args.anchor_weight == "select":
            result["anchor_weight_selection"] = select_anchor_weight(msd_root, data, val_ids, args, main_variant,
                                                                     device)
            result["anchor_weight"] = result["anchor_weight_selection"]["anchor_weight"]
        eval_extra["anchor_weight"] = result["anchor_weight"]
        # a separate, resumable evaluation per sampler setting
        blended = f"_anchor{result['anchor_weight']:g}" if result["anchor_weight"] > 0 else ""
        msd = evaluate_medsegdiff(msd_root, test_dl, {**common, **main_variant}, eval_extra,
                                  f"evaluation{sampling_tag}{blended}")
        result.update({"dice_medsegdiff": msd["dice"], "iou_medsegdiff": msd["iou"], "hd95_medsegdiff": msd["hd95"],
                       "train_minutes_medsegdiff": msd_minutes,
                       "iterations_medsegdiff": training_progress(msd_root)[0], "medsegdiff": msd,
                       "training_loop_medsegdiff": loop_timing(msd_root)})
        if blended:  # the diffusion ensemble alone beside the blend, for the record
            msd_alone = evaluate_medsegdiff(msd_root, test_dl, {**common, **main_variant},
                                            {**eval_extra, "anchor_weight": 0.0}, f"evaluation{sampling_tag}")
            anchor_alone = evaluate_anchor(msd_root, test_dl, {**common, **main_variant}, args.mirror)
            result["ensemble_only"] = scores(msd_alone, "cases")
            result["anchor_only"] = scores(anchor_alone, "cases")

    # (b) DynUNet baseline
    topology = dynunet_topology(args.size, args.baseline_filters[1], args.baseline_filters[0])
    base = None
    if not args.skip_baseline:
        def cases(ids):
            return [{"image": str(data / "images" / f"{c}.jpg"), "label": str(data / "masks" / f"{c}.jpg")} for c in ids]

        base_root = out / "dynunet"
        base_root.mkdir(parents=True, exist_ok=True)
        # the same training cases as MedSegDiff-V2: the validation fold stays out, for the post-processing choice
        # (before 0.10.0 the baseline also trained on it, 494 cases against 469)
        val_set = set(val_ids)
        base_minutes = train_dynunet(base_root, cases([c for c in train_ids if c not in val_set]), args, topology,
                                     device, common["amp"])
        base = evaluate_dynunet(base_root, cases(test_ids), args, topology, device)
        result.update({"dice_baseline": base["dice"], "iou_baseline": base["iou"], "hd95_baseline": base["hd95"],
                       "train_minutes_baseline": base_minutes, "baseline": {"model": "monai DynUNet", **topology,
                                                                            **base}})
        # a folder finished before the iterations were recorded has none (null)
        state = read_json(base_root / "train_state.json")
        result.update({"iterations_baseline": state.get("iterations"), "epochs_baseline": state.get("epochs")})
    # the headline scores are in: a command killed during the stages below (a GPU session's command limit) keeps them
    write_json(out_json, {**result, "partial": "written before post-processing and the optional stages; the end "
                                               "of the run rewrites this file without this key"})
    if args.postprocessing == "select":
        # nnU-Net's step, each model's own, chosen on its validation-fold predictions; the plain scores stay the
        # headline, comparable with runs before it
        pp = result["postprocessing"] = {"chosen_on": f"validation fold ({len(val_ids)} cases, original resolution)"}
        if msd is not None:
            msd_val = evaluate_medsegdiff(msd_root, train_dl, {**common, **main_variant}, eval_extra,
                                          f"evaluation{sampling_tag}{blended}_validation")
            pp["medsegdiff"] = postprocessing_result(msd_val, msd)
            result["dice_medsegdiff_postprocessed"] = pp["medsegdiff"]["dice"]
        if base is not None:
            base_val = evaluate_dynunet(base_root, cases(val_ids), args, topology, device, "validation")
            pp["baseline"] = postprocessing_result(base_val, base)
            result["dice_baseline_postprocessed"] = pp["baseline"]["dice"]
        if msd is not None and base is not None:
            import pandas as pd

            pp["medsegdiff_minus_baseline"] = paired_stats(
                *(pd.Series(pp[k]["dice_per_case"]) for k in ("baseline", "medsegdiff")), "dice",
                ("the baseline's post-processed Dice", "MedSegDiff-V2's post-processed Dice"))
    result["train_minutes"] = {"budget": training_budget(args), "medsegdiff": msd_minutes,
                               "baseline": result.get("train_minutes_baseline")}
    if msd is not None and not args.skip_baseline:  # paired by case: a gap read against the case-to-case spread
        result["dice_minus_baseline"] = {"medsegdiff": paired_difference(Path(base["metrics_csv"]),
                                                                         Path(msd["metrics_csv"]))}
        if blended:
            for key, res in (("ensemble_only", msd_alone), ("anchor_only", anchor_alone)):
                result["dice_minus_baseline"][key] = paired_difference(Path(base["metrics_csv"]),
                                                                       Path(res["metrics_csv"]))

    # DDPM-1000 vs the fast sampler on the first N test cases
    if args.compare_ddpm:
        n = args.ddpm_cases
        sub_dl = out / f"datalist_test_first{n}.json"
        write_json(sub_dl, {"training": json.loads(test_dl.read_text(encoding="utf-8"))["training"][:n]})
        # the samplers alone, without the anchor blend
        fast = evaluate_medsegdiff(msd_root, sub_dl, {**common, **main_variant}, {**eval_extra, "anchor_weight": 0.0},
                                   f"fast_first{n}{sampling_tag}")
        ddpm_t = time.monotonic()
        ddpm = evaluate_medsegdiff_in_parts(msd_root, test_dl, n, args.ddpm_part, {**common, **main_variant},
                                            {"sampler": "ddpm", "steps": 1000, "ensemble": args.ensemble, **compiled,
                                             **mirroring}, f"ddpm{'_mirror' if args.mirror else ''}")
        result["ddpm"] = {"cases": ddpm["cases"], "ensemble": args.ensemble, "dice_ddpm1000": ddpm["dice"],
                          "iou_ddpm1000": ddpm["iou"], "hd95_ddpm1000": ddpm["hd95"],
                          f"dice_{args.sampler}{args.steps}": fast["dice"], "dice_fast": fast["dice"],
                          "iou_fast": fast["iou"], "hd95_fast": fast["hd95"],
                          "dice_ddpm1000_minus_fast": paired_difference(Path(fast["metrics_csv"]),
                                                                        Path(ddpm["metrics_csv"])),
                          "ddpm_eval_minutes_this_run": (time.monotonic() - ddpm_t) / 60.0}

    if args.trajectory > 0:
        result["trajectory"] = sampler_trajectory(msd_root, data, test_ids, args, main_variant, device)

    def score_variant(root: Path, settings: dict, minutes: float | None) -> dict:
        """An ablation variant's test scores, with its own blend: with ``--anchor-weight select`` each variant chooses
        it on the validation fold as the main model does (the switches change how much the denoiser adds to the
        anchor), paired by case against the main model and, when this run scored it, against DynUNet."""
        weight = result["anchor_weight"]
        entry = {**settings}
        if args.anchor_weight == "select" and root != msd_root:
            entry["anchor_weight_selection"] = select_anchor_weight(root, data, val_ids, args, settings, device)
            weight = entry["anchor_weight_selection"]["anchor_weight"]
        tag = f"_anchor{weight:g}" if weight > 0 else ""
        res = evaluate_medsegdiff(root, test_dl, {**common, **settings}, {**eval_extra, "anchor_weight": weight},
                                  f"evaluation{sampling_tag}{tag}")
        anchor = evaluate_anchor(root, test_dl, {**common, **settings}, args.mirror)
        entry.update({**scores(res), "anchor_weight": weight, "train_minutes": minutes,
                      "iterations": training_progress(root)[0],
                      "dice_minus_main_model": paired_difference(Path(msd["metrics_csv"]), Path(res["metrics_csv"])),
                      "anchor_only": scores(anchor)})
        compared = {"medsegdiff": res, "anchor_only": anchor}  # the keys of the main model's dice_minus_baseline
        if weight > 0:  # the denoiser's share: the variants differ in what conditions it, so score it alone too
            alone = evaluate_medsegdiff(root, test_dl, {**common, **settings}, {**eval_extra, "anchor_weight": 0.0},
                                        f"evaluation{sampling_tag}")
            main_alone = msd_alone if blended else msd
            entry["ensemble_only"] = {**scores(alone), "dice_minus_main_model": paired_difference(
                Path(main_alone["metrics_csv"]), Path(alone["metrics_csv"]))}
            compared["ensemble_only"] = alone
        if base is not None:
            entry["dice_minus_baseline"] = {k: paired_difference(Path(base["metrics_csv"]), Path(r["metrics_csv"]))
                                            for k, r in compared.items()}
        return entry

    # ablations: same budget (wall clock, or the main model's epochs), same data, only anchor / semantic differ
    variants = [v.strip() for v in args.ablations.split(",") if v.strip()]
    if variants:
        equal_epochs = args.ablation_budget == "epochs"
        key = "ablations_equal_epochs" if equal_epochs else "ablations"
        result[key] = {}
        if equal_epochs:
            result["ablation_epochs"] = training_progress(msd_root)[1]
        for v in variants:
            settings = variant_settings(v)
            root = msd_root if settings == main_variant else \
                out / f"ablation_{re.sub(r'[^a-z0-9_]+', '-', v.lower())}{'_equal_epochs' if equal_epochs else ''}"
            if root == msd_root:
                minutes = msd_minutes
            elif equal_epochs:
                minutes = train_medsegdiff(root, None, {**common, **settings},
                                           {**train_extra, "max_epochs": result["ablation_epochs"]}, args.lr_floor)
            else:
                minutes = train_medsegdiff(root, training_budget(args), {**common, **settings}, train_extra,
                                           args.lr_floor)
            result[key][v] = score_variant(root, settings, minutes)

    result["wall_minutes_this_run"] = (time.monotonic() - t0) / 60.0
    write_json(out_json, result)

    def fmt(x):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"

    print()
    print(f"device {result['device']}; test cases {len(test_ids)} (original resolution); budget "
          f"{f'{args.epochs} epochs' if args.epochs else f'{args.minutes} min'}; augmentation {args.augmentation}")
    print(f"{'model':<44}{'Dice':>8}{'IoU':>8}{'HD95 px':>10}{'train min':>11}")
    if msd is not None:
        blend = f", anchor {result['anchor_weight']:g}" if result["anchor_weight"] > 0 else ""
        blend += ", mirrored" if args.mirror else ""
        print(f"{f'MedSegDiff-V2 ({args.sampler} {args.steps}, ens {args.ensemble}{blend})':<44}{fmt(msd['dice']):>8}"
              f"{fmt(msd['iou']):>8}{fmt(msd['hd95']):>10}{msd_minutes:>11.2f}")
    if "dice_baseline" in result:
        name = "DynUNet (nnU-Net-like" + (", mirrored)" if args.mirror else ")")
        print(f"{name:<44}{fmt(result['dice_baseline']):>8}{fmt(result['iou_baseline']):>8}"
              f"{fmt(result['hd95_baseline']):>10}{result['train_minutes_baseline']:>11.2f}")
    if result.get("training_loop_medsegdiff"):
        loop = result["training_loop_medsegdiff"]
        print(f"MedSegDiff-V2 training loop: {loop['images_per_s']:.1f} images/s after the first epoch, "
              f"{100 * loop['data_wait_fraction']:.0f} % of it waiting for the data loader")
    if "dice_minus_baseline" in result:
        gap = result["dice_minus_baseline"]["medsegdiff"]
        print(f"MedSegDiff-V2 - DynUNet per case: Dice {gap['mean']:+.4f} ± {gap['standard_error']:.4f} s.e., median "
              f"{gap['median']:+.4f}, higher on {gap['cases_higher']} and lower on {gap['cases_lower']} "
              f"of {gap['cases']}")

    def row(name: str, r: dict) -> None:
        print(f"{name:<44}{fmt(r['dice']):>8}{fmt(r['iou']):>8}{fmt(r['hd95']):>10}")

    from medsegdiff_bundle.evaluation import plan_summary

    for key, name in (("medsegdiff", "MedSegDiff-V2"), ("baseline", "DynUNet")):
        if key in result.get("postprocessing", {}):
            r = result["postprocessing"][key]
            print(f"{name} post-processing: {plan_summary({'steps': r['steps'], 'scores': r['validation']})}; test "
                  f"Dice {fmt(r['dice'])} "
                  f"({r['minus_raw']['mean']:+.4f} per case, higher on {r['minus_raw']['cases_higher']} and lower "
                  f"on {r['minus_raw']['cases_lower']} of {r['minus_raw']['cases']})")

    if "ensemble_only" in result:
        row("  the ensemble alone (no anchor)", result["ensemble_only"])
        row("  the anchor alone (condition UNet)", result["anchor_only"])
    if "anchor_weight_selection" in result:
        sel = result["anchor_weight_selection"]
        print(f"anchor_weight {sel['anchor_weight']:g} selected on the {sel['selected_on']}: Dice by weight "
              f"{sel['validation_dice']}")
    if "ddpm" in result:
        d = result["ddpm"]
        gap = d["dice_ddpm1000_minus_fast"]
        print(f"first {d['cases']} test cases: Dice DDPM-1000 {fmt(d['dice_ddpm1000'])} vs "
              f"{args.sampler}-{args.steps} {fmt(d['dice_fast'])} (per case: {gap['mean']:+.4f} "
              f"± {gap['standard_error']:.4f} s.e., median {gap['median']:+.4f})")
    if "trajectory" in result:
        tr = result["trajectory"]
        print(f"first {tr['cases']} test cases at {tr['size']}²: anchor Dice {fmt(tr['anchor_dice'])}, predicted x0 after "
              f"step 1 {fmt(tr['first_step_dice'])}, best step {fmt(tr['best_step_dice'])}, final {fmt(tr['final_dice'])}")
    ablations = {f"ablation {v}": r for v, r in result.get("ablations", {}).items()}
    ablations.update({f"ablation {v}, equal epochs": r for v, r in result.get("ablations_equal_epochs", {}).items()})
    for v, r in ablations.items():
        name = f"{v}{f', anchor {w:g}' if (w := r.get('anchor_weight', 0)) else ''}"
        print(f"{name:<44}{fmt(r['dice']):>8}{fmt(r['iou']):>8}{fmt(r['hd95']):>10}"
              f"{r['train_minutes']:>11.2f}")
        if "ensemble_only" in r:
            row("  the ensemble alone", r["ensemble_only"])
        row("  the anchor alone", r["anchor_only"])
        if "dice_minus_baseline" in r:
            gap = r["dice_minus_baseline"]["medsegdiff"]
            print(f"  the variant - DynUNet per case: Dice {gap['mean']:+.4f} ± {gap['standard_error']:.4f} s.e., "
                  f"higher on {gap['cases_higher']} and lower on {gap['cases_lower']} of {gap['cases']}")
    print(f"results: {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
