"""ProgressCosineLR (cosine over the larger of the iteration and time-budget shares) and TimeBudgetHandler's clock."""

from __future__ import annotations

import io
import math
import time
import warnings

import pytest
import torch
from ignite.engine import Engine, Events

from medsegdiff_bundle.engine import ProgressCosineLR, TimeBudgetHandler, cosine_annealed


class _Budget:
    def __init__(self, share: float = 0.0) -> None:
        self.share = share

    def fraction(self) -> float:
        return self.share


def _optimizer(lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def test_cosine_annealed_runs_from_the_start_rate_to_the_floor_and_clips_progress():
    assert cosine_annealed(1.0, 0.1, 0.0) == 1.0 and cosine_annealed(1.0, 0.1, 1.0) == pytest.approx(0.1)
    assert cosine_annealed(1.0, 0.1, 0.5) == pytest.approx(0.55)
    assert cosine_annealed(1.0, 0.1, 1.7) == cosine_annealed(1.0, 0.1, 1.0)
    assert cosine_annealed(1.0, 0.1, -0.3) == 1.0


def test_without_a_budget_the_rate_follows_the_cosine_over_the_iterations():
    opt = _optimizer()
    sched = ProgressCosineLR(opt, total_iterations=10, eta_min=1e-4)
    seen = [opt.param_groups[0]["lr"]]
    for _ in range(12):  # two past the end: the rate stays at the floor
        opt.step()
        sched.step()
        seen.append(opt.param_groups[0]["lr"])
    expected = [1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * min(i, 10) / 10)) for i in range(13)]
    assert seen == pytest.approx(expected, rel=1e-9)


def test_the_budget_share_takes_over_when_it_is_ahead_and_is_not_saved():
    opt = _optimizer()
    budget = _Budget()
    sched = ProgressCosineLR(opt, total_iterations=1000, eta_min=0.0, budget=budget)
    for share, expected in [(0.5, 5e-4), (1.0, 0.0), (0.0, None)]:
        budget.share = share
        opt.step()
        sched.step()
        lr = opt.param_groups[0]["lr"]
        if expected is None:  # the iteration share (3 of 1000) again
            assert lr == pytest.approx(cosine_annealed(1e-3, 0.0, 3 / 1000))
        else:
            assert lr == pytest.approx(expected, abs=1e-12)
    state = sched.state_dict()
    assert "budget" not in state and "optimizer" not in state
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = ProgressCosineLR(_optimizer(), total_iterations=1000, budget=budget)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.last_epoch == 3 and restored.budget is budget


@pytest.mark.parametrize("kwargs, message", [({"total_iterations": 0}, "total_iterations"),
                                             ({"total_iterations": 5, "eta_min": -1.0}, "eta_min")])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProgressCosineLR(_optimizer(), **kwargs)


def _run_budget(handler: TimeBudgetHandler, epochs: int, step_s: float) -> Engine:
    engine = Engine(lambda e, b: time.sleep(step_s))
    handler.attach(engine)
    shares = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: shares.append(handler.fraction()))
    engine.run([0, 1], max_epochs=epochs)
    engine.shares = shares
    return engine


def test_time_budget_share_grows_per_epoch_and_a_restored_clock_goes_on_from_the_checkpoint():
    handler = TimeBudgetHandler(minutes=0.01)  # 0.6 s
    engine = _run_budget(handler, epochs=100, step_s=0.05)
    assert 2 <= engine.state.epoch < 100  # stopped on the budget
    assert engine.shares == sorted(engine.shares) and engine.shares[-1] == 1.0
    saved = handler.state_dict()
    assert saved["elapsed_s"] >= 0.6

    resumed = TimeBudgetHandler(minutes=0.01)
    resumed.load_state_dict(saved)
    assert resumed.fraction() == 1.0  # before any epoch: the time already used
    assert _run_budget(resumed, epochs=100, step_s=0.05).state.epoch == 1  # only what was left: stops at once
    assert resumed.state_dict()["elapsed_s"] > saved["elapsed_s"]


def test_without_minutes_the_clock_runs_and_the_share_stays_zero():
    handler = TimeBudgetHandler(minutes=None)
    engine = _run_budget(handler, epochs=3, step_s=0.01)
    assert engine.state.epoch == 3 and engine.shares == [0.0, 0.0, 0.0]
    assert handler.state_dict()["elapsed_s"] > 0


def test_a_floor_above_the_start_rate_is_refused_and_equal_is_constant():
    """eta_min above the learning rate (the bundle's lr_floor > 1) would make the rate rise; equal keeps it constant."""
    with pytest.raises(ValueError, match="lr_floor <= 1"):
        ProgressCosineLR(_optimizer(), total_iterations=10, eta_min=2e-3)
    opt = _optimizer()
    sched = ProgressCosineLR(opt, total_iterations=10, eta_min=1e-3)
    for _ in range(5):
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-3, rel=1e-12)


def test_stepping_every_iteration_of_an_accumulation_cycle_warns_only_of_real_misuse():
    """With gradient accumulation the bundle steps the rate every iteration and the optimiser every n-th, so the
    first rate step comes before the first optimiser step: torch's warning about a skipped first value does not
    apply to a rate that follows progress, and the rate still tracks the iterations. Its check that the optimiser's
    ``step`` was replaced after the scheduler wrapped it still reaches the user."""
    opt = _optimizer()
    sched = ProgressCosineLR(opt, total_iterations=8, eta_min=0.0)
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for iteration in range(1, 9):
            if iteration % 2 == 0:  # accumulation_steps = 2
                opt.step()
            sched.step()
            seen.append(opt.param_groups[0]["lr"])
    assert seen == pytest.approx([cosine_annealed(1e-3, 0.0, i / 8) for i in range(1, 9)], rel=1e-9)

    replaced = _optimizer()
    sched = ProgressCosineLR(replaced, total_iterations=8)
    replaced.step = lambda *a, **k: None
    with pytest.warns(UserWarning, match="overridden"):
        sched.step()
