"""Learning-rate annealing over training progress, where progress may be a wall-clock budget's.

A per-epoch cosine over ``max_epochs`` does not fit a run that stops on a time budget: ``medsegdiff auto
--time_budget`` sets ``max_epochs`` large so that the budget ends the run, and the rate then stays near its start
value and is cut off wherever the budget ends. Annealing over the larger of the iteration share and the budget share
ends either kind of run at ``eta_min`` (budget-aware decay: Li, Yumer & Ramanan, "Budgeted training", ICLR 2020).

The bundle's ``lr_floor`` (``eta_min`` as a fraction of ``learning_rate``) is 1 by default, a constant rate, as the
official MedSegDiff code and diffusion training generally run, with the EMA weights doing the averaging: on
Kvasir-SEG at 885 CPU iterations, annealing to 5 % scored 0.033 Dice lower (README, *Speed and quality*).
"""

from __future__ import annotations

import math
import warnings
from typing import Protocol

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["BudgetProgress", "ProgressCosineLR", "cosine_annealed", "run_progress"]


class BudgetProgress(Protocol):
    """Anything that reports the used share of a training budget (:class:`~medsegdiff_bundle.engine.TimeBudgetHandler`)."""

    def fraction(self) -> float:
        """The used share of the budget in ``[0, 1]`` (``0`` without a budget)."""


def run_progress(iterations: int, total_iterations: int, budget: BudgetProgress | None = None) -> float:
    """The share of a run done after ``iterations``, in ``[0, 1]``: ``max(iterations / total_iterations,
    budget.fraction())``, so that whichever of the iteration count and the time budget ends the run first sets it."""
    p = max(int(iterations), 0) / max(int(total_iterations), 1)
    if budget is not None:
        p = max(p, float(budget.fraction()))
    return min(p, 1.0)


def cosine_annealed(base_lr: float, eta_min: float, progress: float) -> float:
    """``eta_min + (base_lr - eta_min) * (1 + cos(pi * p)) / 2`` with ``p = progress`` clipped to ``[0, 1]``."""
    p = min(max(float(progress), 0.0), 1.0)
    return eta_min + (base_lr - eta_min) * 0.5 * (1.0 + math.cos(math.pi * p))


class ProgressCosineLR(LRScheduler):
    """Cosine annealing of every parameter group from its initial rate to ``eta_min``, stepped once per iteration
    (``LrScheduleHandler(epoch_level=False)``), over the training's progress:
    ``p = max(iterations / total_iterations, budget.fraction())``.

    Without a budget this is the cosine over ``total_iterations`` (``max_epochs * epoch length``), and a resumed run
    follows it exactly (the step count is in :meth:`state_dict`). With a budget the rate reaches ``eta_min`` when the
    budget is used up, whichever of the two ends the run first.

    Args:
        optimizer: the wrapped optimiser.
        total_iterations: iterations of the whole run (``>= 1``).
        eta_min: the final learning rate (``>= 0``).
        budget: optional :class:`BudgetProgress` (the bundle's ``TimeBudgetHandler``); it is not saved with the
            scheduler, which keeps the checkpoint loadable with ``weights_only=True``: the budget saves its own state.
        last_epoch: the index of the last step (``-1``: a fresh start), as for torch's schedulers.

    Raises:
        ValueError: ``total_iterations < 1``, ``eta_min < 0``, or ``eta_min`` above a group's learning rate.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_iterations: int, eta_min: float = 0.0,
                 budget: BudgetProgress | None = None, last_epoch: int = -1) -> None:
        if int(total_iterations) < 1:
            raise ValueError(f"total_iterations must be >= 1, got {total_iterations}.")
        if not float(eta_min) >= 0.0:
            raise ValueError(f"eta_min must be >= 0, got {eta_min}.")
        self.total_iterations = int(total_iterations)
        self.eta_min = float(eta_min)
        self.budget = budget  # set before the base class's first step, which calls get_lr
        starts = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]  # a resumed run's start is initial_lr
        above = [lr for lr in starts if self.eta_min > lr]
        if above:  # e.g. the bundle's lr_floor above 1: the "annealed" rate would rise
            raise ValueError(f"eta_min ({self.eta_min:g}) is above the learning rate of {len(above)} parameter "
                             f"group(s) ({above[0]:g}); the rate would rise instead of anneal (lr_floor <= 1).")
        super().__init__(optimizer, last_epoch)

    def progress(self) -> float:
        """The share of the run done, in ``[0, 1]`` (:func:`run_progress` of the steps taken)."""
        return run_progress(self.last_epoch, self.total_iterations, self.budget)

    def get_lr(self) -> list[float]:
        p = self.progress()
        return [cosine_annealed(base, self.eta_min, p) for base in self.base_lrs]

    def step(self, epoch: int | None = None) -> None:
        """Advance one training iteration (``epoch`` is torch's deprecated argument, passed on as it is)."""
        # the bundle steps the rate every iteration, also those in which gradient accumulation leaves the optimiser
        # alone; the rate follows the run's progress, not the optimiser's steps, so torch's warning that the first
        # value is skipped when the optimiser has not stepped yet does not apply (its other warnings do). torch
        # checks the order at the first step only, and catch_warnings resets every module's once-only warnings, so
        # the later steps, one per training iteration, go straight through
        if self._step_count != 1:
            super().step(epoch)
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer")
            super().step(epoch)

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "budget")}
