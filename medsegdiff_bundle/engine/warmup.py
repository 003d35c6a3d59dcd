"""Condition warm-up: the first share of a run trains the condition UNet alone, on its anchor loss.

Why: the condition UNet C is an nnU-Net-like segmenter on its own, and its anchor is what the denoiser D refines
(D's validation Dice follows the anchor's within about 0.01 on Kvasir-SEG). A joint step runs C and D, and on a GPU
D's many small kernels make it host-bound: on an H100 the bundle loop trained 184 img/s where the DynUNet baseline
trained 685, so in 10 minutes C saw 3400 batches against DynUNet's 12900. A warm-up step runs C alone (on the 2-core
CPU 0.56 of a joint step), so C sees more batches in the same time, and D then trains on an anchor that is already
good. D's weights are untouched during the warm-up (their gradients stay ``None``, so AdamW leaves them and their
moments alone), and the EMA restarts its warm-up at the switch, so that the averaged D is not tied to its untrained
initial weights for thousands of iterations (an EMA of decay 0.999 keeps 13.5 % of a weight 2000 updates old).
"""

from __future__ import annotations

import logging
from typing import Any

from .ema import EMAModel
from .schedule import BudgetProgress, run_progress

__all__ = ["ConditionWarmup"]


class ConditionWarmup:
    """Decides, per training iteration, whether the condition UNet trains alone (:class:`DiffusionTrainIteration`
    asks :meth:`step`), and restarts the EMA once, at the first joint iteration.

    The phase follows the run's progress as the learning rate does (:func:`~medsegdiff_bundle.engine.schedule.
    run_progress`: the larger of the iteration share and the time budget's share), so a time-budgeted run spends
    ``fraction`` of its budget on the warm-up. Progress is a function of the restored trainer, budget and this
    object's state, so a resumed run switches at the same iteration as an uninterrupted one.

    Args:
        fraction: the share of the run trained on the anchor loss alone, in ``[0, 1)``; ``0`` (default) is the
            paper's joint training from the first iteration.
        total_iterations: iterations of the whole run (``max_epochs * len(dataloader)``), as for the LR schedule.
        budget: optional time budget (:class:`~medsegdiff_bundle.engine.TimeBudgetHandler`).
        ema: the averaged model whose warm-up restarts at the switch (``None``: no EMA).

    Raises:
        ValueError: ``fraction`` outside ``[0, 1)`` or ``total_iterations < 1``.
    """

    def __init__(self, fraction: float = 0.0, total_iterations: int = 1, budget: BudgetProgress | None = None,
                 ema: EMAModel | None = None) -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= float(fraction) < 1.0:
            raise ValueError(f"condition_warmup must be a number in [0, 1) (the share of training spent on the "
                             f"condition UNet alone), got {fraction!r}.")
        if int(total_iterations) < 1:
            raise ValueError(f"total_iterations must be >= 1, got {total_iterations}.")
        self.fraction = float(fraction)
        self.total_iterations = int(total_iterations)
        self.budget = budget
        self.ema = ema
        self.ended = False

    def active(self, iteration: int) -> bool:
        """Whether training ``iteration`` (1-based, as ignite counts) is a warm-up iteration: the progress after the
        ``iteration - 1`` iterations before it is below ``fraction``."""
        return run_progress(int(iteration) - 1, self.total_iterations, self.budget) < self.fraction

    def step(self, iteration: int) -> bool:
        """:meth:`active` for this iteration; at the first joint iteration the EMA restarts (once per run)."""
        if self.ended or self.fraction == 0.0:  # a run without a warm-up has nothing to switch
            return False
        if self.active(iteration):
            return True
        self.ended = True
        if self.ema is not None:
            self.ema.restart()
        logging.getLogger(__name__).info(f"condition warm-up done after {int(iteration) - 1} iterations: the "
                                         "denoiser trains from here on (EMA restarted).")
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"ended": self.ended}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ended = bool(state["ended"])
