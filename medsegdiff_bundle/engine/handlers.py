"""Ignite/MONAI handlers the bundle attaches: training curves, per-case metric tables, checkpoint discovery."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from monai.utils import CommonKeys as Keys

from ..data.datalist import output_name
from ..evaluation.metrics import case_metrics, format_summary_markdown, summarize_metrics
from ..evaluation.postprocessing import component_candidates, plan_summary, select_postprocessing
from ..evaluation.visualize import save_training_curves
from ..utils import write_json_atomic

__all__ = [
    "TrainingCurvesHandler", "LoopTimingHandler", "MetricsTableHandler", "TimeBudgetHandler", "latest_checkpoint",
    "resume_from_latest",
]


def latest_checkpoint(ckpt_dir: str | Path, pattern: str = "checkpoint*.pt") -> str | None:
    """Path of the newest training checkpoint (highest epoch/iteration number in its name) in ``ckpt_dir``."""
    files = list(Path(ckpt_dir).glob(pattern))
    if not files:
        return None

    def number(p: Path) -> int:
        found = re.findall(r"=(\d+)", p.name)
        return int(found[-1]) if found else -1

    return str(max(files, key=lambda p: (number(p), p.stat().st_mtime)))


class TrainingCurvesHandler:
    """Record the training losses per iteration and the validation metrics per epoch; write
    ``training_log.csv``, ``validation_log.csv`` and ``training_curves.png`` (losses; validation metrics in a second
    panel) in ``output_dir`` after every epoch.

    The losses stay on their device until the epoch's files are written, then come back in one transfer: reading
    each iteration's values (``float(loss)``) would make the host wait for the GPU at every step, so it could not
    queue the next step's kernels while the GPU runs this one.

    A resumed run keeps the curves: at its first write, the rows already in ``output_dir`` from before the
    iteration (and epoch) it resumed at are kept ahead of its own; a fresh run (iteration 1) replaces them.

    Args:
        output_dir: where the files go.
        evaluator: the validation engine (its ``state.metrics`` are logged after each of its runs).
        loss_keys: keys of ``engine.state.output`` to record (first item when the output is decollated); keys an
            output lacks (``x0_dice_loss`` when that term is off) are left out.
        plot_interval_s: the PNG is drawn again only when this many seconds have passed since the last one (and
            always when the run ends); the CSVs are written every epoch. Drawing takes a few tenths of a second, a few
            per cent of a short GPU epoch. ``0`` draws every epoch.
    """

    def __init__(self, output_dir: str | Path, evaluator: Any = None,
                 loss_keys: tuple[str, ...] = (Keys.LOSS, "diffusion_loss", "anchor_loss", "x0_dice_loss"),
                 plot_interval_s: float = 30.0) -> None:
        self.output_dir = Path(output_dir)
        self.evaluator = evaluator
        self.loss_keys = loss_keys
        self.plot_interval_s = float(plot_interval_s)
        self._last_plot: float | None = None
        self._earlier_merged = False
        self.rows: list[dict[str, float]] = []
        self.val_rows: list[dict[str, float]] = []
        self._trainer: Any = None
        self._pending: list[tuple[dict[str, int], dict[str, torch.Tensor]]] = []  # rows whose losses are on device

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        self._trainer = engine
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)
        engine.add_event_handler(Events.COMPLETED, self.write, True)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.COMPLETED, self.validation_completed)

    def iteration_completed(self, engine: Any) -> None:
        out = engine.state.output
        out = out[0] if isinstance(out, list) else out
        row = {"iteration": int(engine.state.iteration), "epoch": int(engine.state.epoch)}
        losses = {key: torch.as_tensor(out[key]).detach().float().mean() for key in self.loss_keys if key in out}
        self._pending.append((row, losses))

    def _settle(self) -> None:
        """Bring the pending losses to the host (one transfer) and append their rows."""
        values = [v for _, losses in self._pending for v in losses.values()]
        numbers = iter(torch.stack(values).tolist() if values else [])
        for row, losses in self._pending:
            self.rows.append({**row, **{key: next(numbers) for key in losses}})
        self._pending.clear()

    def validation_completed(self, evaluator: Any) -> None:
        row = {"epoch": int(self._trainer.state.epoch) if self._trainer is not None else 0}
        row.update({k: float(v) for k, v in evaluator.state.metrics.items() if isinstance(v, (int, float))})
        self.val_rows.append(row)

    def _merge_earlier(self) -> None:
        """Put the rows of the run this one resumed (those before its first iteration / epoch) ahead of its own."""
        self._earlier_merged = True
        first_iteration, first_epoch = self.rows[0]["iteration"], self.rows[0]["epoch"]
        train_csv, val_csv = self.output_dir / "training_log.csv", self.output_dir / "validation_log.csv"
        if first_iteration > 1 and train_csv.is_file():
            earlier = pd.read_csv(train_csv)
            self.rows[:0] = earlier[earlier["iteration"] < first_iteration].to_dict("records")
        if first_iteration > 1 and val_csv.is_file():
            earlier = pd.read_csv(val_csv)
            self.val_rows[:0] = earlier[earlier["epoch"] < first_epoch].to_dict("records")

    def write(self, engine: Any = None, final: bool = False) -> None:
        """Write the CSVs, and the PNG when ``final`` or ``plot_interval_s`` has passed since the last one."""
        self._settle()
        if not self.rows:
            return
        if not self._earlier_merged:
            self._merge_earlier()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        log = pd.DataFrame(self.rows)
        log.to_csv(self.output_dir / "training_log.csv", index=False)
        history = {"iteration": log["iteration"].tolist()}
        history.update({k: log[k].tolist() for k in self.loss_keys if k in log})
        validation = None
        if self.val_rows:
            val_log = pd.DataFrame(self.val_rows)
            val_log.to_csv(self.output_dir / "validation_log.csv", index=False)
            validation = {k: val_log[k].tolist() for k in val_log.columns}
        now = time.monotonic()
        if final or self._last_plot is None or now - self._last_plot >= self.plot_interval_s:
            save_training_curves(self.output_dir / "training_curves.png", history, validation=validation)
            self._last_plot = now


class LoopTimingHandler:
    """Where an epoch's wall time goes: the training loop's images per second and the share spent waiting for the
    data loader, one row per epoch in ``output_dir/loop_timing.csv`` (columns ``epoch``, ``iterations``, ``images``,
    ``seconds``, ``data_wait_seconds``, ``data_wait_fraction``, ``images_per_s`` and, for an engine with an
    optimiser, ``learning_rate``: its first parameter group's at the epoch's end).

    A loop that waits for its loader a large share of the time needs more workers or a cache, not a faster GPU. The
    clock is the host's: the training iteration does not wait for the GPU, so the wait for a batch is time the GPU
    could have been fed. ``seconds`` runs from the epoch's start to this handler's call at its end (register it
    before the checkpoint saver to leave the saving out). A resumed run appends its epochs; rows of an epoch the
    checkpoint did not keep (a run stopped between this write and the checkpoint's) are replaced.
    """

    def __init__(self, output_dir: str | Path, filename: str = "loop_timing.csv") -> None:
        self.path = Path(output_dir) / filename
        self._epoch_start = 0.0
        self._batch_start = 0.0
        self._wait = 0.0
        self._iterations = 0
        self._images = 0

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self.batch_started)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self.batch_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def epoch_started(self, engine: Any) -> None:
        self._epoch_start = time.perf_counter()
        self._wait, self._iterations, self._images = 0.0, 0, 0

    def batch_started(self, engine: Any) -> None:
        self._batch_start = time.perf_counter()

    def batch_completed(self, engine: Any) -> None:
        self._wait += time.perf_counter() - self._batch_start
        self._iterations += 1
        self._images += _batch_size(engine.state.batch)

    def epoch_completed(self, engine: Any) -> None:
        seconds = time.perf_counter() - self._epoch_start
        epoch = int(engine.state.epoch)
        row = {"epoch": epoch, "iterations": self._iterations, "images": self._images, "seconds": seconds,
               "data_wait_seconds": self._wait, "data_wait_fraction": self._wait / seconds if seconds > 0 else 0.0,
               "images_per_s": self._images / seconds if seconds > 0 else 0.0}
        optimizer = getattr(engine, "optimizer", None)
        if optimizer is not None and optimizer.param_groups:
            row["learning_rate"] = float(optimizer.param_groups[0]["lr"])
        log = pd.DataFrame([row])
        if self.path.is_file():
            earlier = pd.read_csv(self.path)
            log = pd.concat([earlier[earlier["epoch"] < epoch], log], ignore_index=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        part = self.path.with_name(self.path.name + ".part")
        log.to_csv(part, index=False)
        part.replace(self.path)  # a run killed mid-write keeps the previous table


def _batch_size(batch: Any) -> int:
    """Samples in a collated batch: the first dimension of its first tensor (dict values, list or tuple items, or
    the batch itself); 0 when it holds no tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        if isinstance(item, torch.Tensor):
            return _batch_size(item)
    for item in items:
        if isinstance(item, (dict, list, tuple)):
            n = _batch_size(item)
            if n:
                return n
    return 0


class MetricsTableHandler:
    """Per-case, per-class Dice / IoU / HD95 on an evaluator's (decollated, post-processed) output; writes
    ``metrics.csv``, ``metrics_summary.csv`` and ``metrics_summary.md`` when the run completes.

    Each output item needs ``pred`` (label map ``(1, *S)``) and ``label`` (``(1, *S)``) in the same geometry; the
    case name comes from the image's ``filename_or_obj`` (:func:`~medsegdiff_bundle.data.datalist.output_name`, with
    ``data_root_dir`` as the written label maps use it); HD95 uses the image's pixel spacing when known.

    With ``postprocessing_candidates`` it also scores each case under the largest-component variants
    (:func:`~medsegdiff_bundle.evaluation.postprocessing.component_candidates`) into
    ``postprocessing_candidates.csv``, and writes ``postprocessing.json``: the plan those cases choose
    (:func:`~medsegdiff_bundle.evaluation.postprocessing.select_postprocessing`). Apply that plan to other cases
    only when these were validation cases (``evaluate.json``'s default fold); the candidates of test cases score
    any plan on them without a second pass (:func:`~medsegdiff_bundle.evaluation.postprocessing.dice_under_plan`).
    The candidates cost about 8 ms for a 620x530 image and 5 s for a 240x240x155 volume of 5 classes on one core.
    """

    def __init__(self, output_dir: str | Path, num_classes: int, class_names: list[str] | None = None,
                 pred_key: str = Keys.PRED, label_key: str = Keys.LABEL, image_key: str = Keys.IMAGE,
                 data_root_dir: str | Path | None = None, postprocessing_candidates: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.data_root_dir = data_root_dir
        self.num_classes = num_classes
        self.class_names = class_names
        self.pred_key, self.label_key, self.image_key = pred_key, label_key, image_key
        self.postprocessing_candidates = postprocessing_candidates
        self.tables: list[pd.DataFrame] = []
        self.candidates: list[pd.DataFrame] = []

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def iteration_completed(self, engine: Any) -> None:
        items = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        batch = engine.state.batch if isinstance(engine.state.batch, list) else None
        for i, item in enumerate(items):
            pred, label = item[self.pred_key], item.get(self.label_key)
            if label is None and batch is not None:
                label = batch[i].get(self.label_key)
            if label is None:
                raise ValueError("MetricsTableHandler needs a label for every case.")
            meta = getattr(pred, "meta", {}) or {}
            source = meta.get("filename_or_obj")
            name = output_name(str(source), self.data_root_dir) if source else f"case_{len(self.tables)}"
            spacing = None
            if "pixdim" in meta:
                spacing = [float(s) for s in torch.as_tensor(meta["pixdim"])[1 : pred.ndim].tolist()]
            pred, label = torch.as_tensor(pred).long().cpu(), torch.as_tensor(label).long().cpu()
            self.tables.append(case_metrics(pred[None], label[None], self.num_classes, [name], spacing,
                                            self.class_names))
            if self.postprocessing_candidates:
                self.candidates.append(component_candidates(pred, label, self.num_classes, name))

    def write(self, engine: Any = None) -> pd.DataFrame:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        table = pd.concat(self.tables, ignore_index=True) if self.tables else pd.DataFrame(
            columns=["case", "class", "dice", "iou", "hd95"])
        table.to_csv(self.output_dir / "metrics.csv", index=False)
        if len(table):
            summary = summarize_metrics(table)
            summary.to_csv(self.output_dir / "metrics_summary.csv", index=False)
            (self.output_dir / "metrics_summary.md").write_text(format_summary_markdown(summary) + "\n", encoding="utf-8")
        if self.candidates:
            candidates = pd.concat(self.candidates, ignore_index=True)
            candidates.to_csv(self.output_dir / "postprocessing_candidates.csv", index=False)
            plan = select_postprocessing(candidates)
            write_json_atomic(self.output_dir / "postprocessing.json", plan)
            logging.getLogger(__name__).info(f"post-processing these cases choose: {plan_summary(plan)}")
        return table


# checkpoint entries that a checkpoint of an earlier bundle version may lack; resuming goes on without them
OPTIONAL_CHECKPOINT_KEYS = ("time_budget", "condition_warmup")


def resume_from_latest(trainer: Any, ckpt_dir: str | Path, load_dict: dict, map_location: Any = None) -> str | None:
    """Attach a ``CheckpointLoader`` for the newest checkpoint in ``ckpt_dir`` (``weights_only=True`` inside MONAI).

    The checkpoint holds model, EMA, optimizer, LR scheduler, the trainer's epoch/iteration and the time budget
    used, so training goes on exactly where it stopped. An entry of :data:`OPTIONAL_CHECKPOINT_KEYS` that the
    checkpoint lacks (written before it existed) is skipped with a warning. Returns the path used, or ``None``
    (nothing to resume: a fresh start).
    """
    from monai.handlers import CheckpointLoader

    log = logging.getLogger(__name__)
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        log.info(f"resume requested but no checkpoint in {ckpt_dir}: starting fresh.")
        return None
    optional = [k for k in OPTIONAL_CHECKPOINT_KEYS if k in load_dict]
    if optional:
        # mmap: only the key names are read here, the tensors once, by the loader
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        missing = [k for k in optional if k not in saved]
        if missing:
            log.warning(f"{path} has no {missing} (an earlier bundle version): resuming without it; a time budget "
                        "then starts anew, a condition warm-up counts as not yet ended.")
            load_dict = {k: v for k, v in load_dict.items() if k not in missing}
    CheckpointLoader(load_path=path, load_dict=load_dict, map_location=map_location).attach(trainer)
    log.info(f"resuming from {path}")
    return path


class TimeBudgetHandler:
    """Stop training at the end of the first epoch that finishes after ``minutes`` of training time.

    Registered before the checkpoint saver, so that epoch's checkpoint is still written and ``--resume true``
    (or ``medsegdiff auto`` run again) continues from it. The training time used so far is part of the checkpoint
    (:meth:`state_dict`, under ``time_budget`` in ``train.json``'s ``checkpoint_dict``), so a resumed run spends what
    is left of the budget, not a new one; the time of an epoch cut short by a crash is not counted. ``minutes``
    ``None`` or ``<= 0`` disables the budget.

    :meth:`fraction` (the used share, for :class:`~medsegdiff_bundle.engine.ProgressCosineLR`) is updated at every
    epoch end, from the slowest process's clock under ``torch.distributed``: every rank then anneals its learning
    rate identically, as data-parallel replicas must.
    """

    def __init__(self, minutes: float | None = None) -> None:
        self.minutes = minutes
        self._start: float | None = None
        self._before_s = 0.0  # training seconds of earlier runs, up to the checkpoint this one resumed from
        self._used_s = 0.0  # training seconds up to the last epoch end, the same on every rank

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def started(self, engine: Any) -> None:
        self._start = time.monotonic()

    @property
    def enabled(self) -> bool:
        return bool(self.minutes) and self.minutes > 0

    def fraction(self) -> float:
        """The share of the budget used up to the last epoch end, in ``[0, 1]`` (``0`` without a budget)."""
        return min(1.0, self._used_s / (60.0 * self.minutes)) if self.enabled else 0.0

    def state_dict(self) -> dict[str, float]:
        return {"elapsed_s": self._used_s}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self._before_s = self._used_s = float(state["elapsed_s"])

    def __call__(self, engine: Any) -> None:
        if self._start is None:
            return
        used = torch.tensor([self._before_s + time.monotonic() - self._start], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # one clock for all ranks: the same learning rate everywhere, and every rank stops after the same epoch
            # (or the others wait forever in the next all-reduce)
            if torch.distributed.get_backend() == "nccl":
                used = used.cuda()
            torch.distributed.all_reduce(used, op=torch.distributed.ReduceOp.MAX)
        self._used_s = float(used.item())
        if self.enabled and self._used_s >= 60.0 * self.minutes:
            logging.getLogger(__name__).info(
                f"time budget of {self.minutes} min used ({self._used_s / 60.0:.1f} min) after epoch "
                f"{engine.state.epoch}: stopping."
            )
            engine.terminate()
