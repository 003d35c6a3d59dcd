"""Condition warm-up (``engine.ConditionWarmup``): when it trains the condition UNet alone, the EMA restart at the
switch, its checkpoint state, and the iteration's warm-up step through ``train.json``."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from ignite.engine import Events

from medsegdiff_bundle.data import write_synthetic_dataset
from medsegdiff_bundle.diffusion import MedSegDiffLoss
from medsegdiff_bundle.engine import ConditionWarmup, EMAModel, run_progress
from tests.bundle_utils import workflow


class _Budget:
    """A stand-in for ``TimeBudgetHandler``: the used share of the budget, set by the test."""

    def __init__(self) -> None:
        self.used = 0.0

    def fraction(self) -> float:
        return self.used


def _ema() -> EMAModel:
    ema = EMAModel(torch.nn.Linear(2, 2), decay=0.99)
    ema.num_updates.fill_(50)
    return ema


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5, True, "0.5", None])
def test_a_fraction_outside_zero_to_one_is_refused_naming_the_key(fraction):
    with pytest.raises(ValueError, match=r"condition_warmup must be a number in \[0, 1\)"):
        ConditionWarmup(fraction, total_iterations=10)


def test_the_first_share_of_the_iterations_is_the_warm_up_and_the_ema_restarts_once_at_the_switch():
    ema = _ema()
    warmup = ConditionWarmup(0.25, total_iterations=8, ema=ema)
    # iteration i (1-based) follows i - 1 done iterations: progress 0/8 and 1/8 are below 0.25, 2/8 is not
    assert [warmup.active(i) for i in range(1, 9)] == [True, True] + [False] * 6
    assert warmup.step(1) and warmup.step(2)
    assert int(ema.num_updates) == 50 and not warmup.ended
    assert not warmup.step(3)
    assert warmup.ended and int(ema.num_updates) == 0  # the next update blends at decay (1 + 0) / (10 + 0)
    ema.num_updates.fill_(7)
    assert not warmup.step(4) and not warmup.step(5)
    assert int(ema.num_updates) == 7  # once per run


def test_with_a_time_budget_the_warm_up_takes_that_share_of_the_budget():
    budget = _Budget()
    warmup = ConditionWarmup(0.5, total_iterations=10_000, budget=budget)
    assert warmup.step(400)  # few iterations of a large max_epochs: the budget's share decides
    budget.used = 0.49
    assert warmup.step(401)
    budget.used = 0.5
    assert not warmup.step(402) and warmup.ended
    assert run_progress(401, 10_000, budget) == 0.5


def test_a_restored_state_after_the_switch_does_not_restart_the_ema_again():
    first = ConditionWarmup(0.5, total_iterations=4, ema=_ema())
    for i in range(1, 4):
        first.step(i)
    state = first.state_dict()
    assert state == {"ended": True}

    ema = _ema()
    resumed = ConditionWarmup(0.5, total_iterations=4, ema=ema)
    resumed.load_state_dict(state)
    assert not resumed.step(4)
    assert int(ema.num_updates) == 50


def test_without_a_warm_up_nothing_switches_even_from_a_state_that_had_not_ended():
    ema = _ema()
    warmup = ConditionWarmup(0.0, total_iterations=4, ema=ema)
    warmup.load_state_dict({"ended": False})
    assert not any(warmup.step(i) for i in range(1, 5))
    assert int(ema.num_updates) == 50


def test_condition_loss_is_the_anchor_term_of_the_joint_loss():
    torch.manual_seed(0)
    loss_fn = MedSegDiffLoss(num_classes=3)
    logits = torch.randn(2, 3, 8, 8)
    label = torch.randint(0, 3, (2, 1, 8, 8))
    alone = loss_fn.condition_loss(logits, label)
    joint = loss_fn(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8), logits, label, torch.zeros(2, dtype=torch.long),
                    x0_pred=torch.zeros(2, 3, 8, 8))
    assert torch.allclose(alone["loss"], joint["anchor"]) and float(alone["loss"]) > 0
    assert set(alone) == {"loss", "anchor"}
    with pytest.raises(ValueError):
        loss_fn.condition_loss(logits, label + 3)  # labels outside the class range are refused as in training


@pytest.mark.slow
def test_train_json_warm_up_trains_only_the_condition_unet_then_everything(tmp_path):
    """2 epochs at condition_warmup 0.5: after epoch 1 only condition-UNet weights moved; after epoch 2 the denoiser
    did too; the EMA restarted at the switch; the curves log the anchor loss alone during the warm-up."""
    write_synthetic_dataset(tmp_path / "data", 8, (32, 32), seed=3)
    wf = workflow("train", "train", tmp_path, patch_size=[32, 32], batch_size=2, max_epochs=2, val_interval=5,
                  dataset_dir=str(tmp_path / "data"), condition_warmup=0.5)
    network = wf.parser.get_parsed_content("network")
    trainer = wf.parser.get_parsed_content("train#trainer")
    init = {k: v.clone() for k, v in network.state_dict().items()}
    after: dict[int, dict[str, torch.Tensor]] = {}
    trainer.add_event_handler(Events.EPOCH_COMPLETED,
                              lambda e: after.__setitem__(e.state.epoch, {k: v.clone() for k, v in
                                                                          network.state_dict().items()}))
    wf.run()
    epoch_length = trainer.state.epoch_length
    assert epoch_length >= 2

    def moved(state: dict[str, torch.Tensor], prefix: str, inside: bool) -> list[str]:
        return [k for k, v in state.items() if k.startswith(prefix) == inside and v.is_floating_point()
                and not torch.equal(v, init[k])]

    assert moved(after[1], "condition_unet.", inside=True), "the condition UNet did not train in the warm-up"
    # the denoiser, U-SA, SS-Former, time embedding and semantic projection are exactly as initialised
    assert moved(after[1], "condition_unet.", inside=False) == []
    assert any(k.startswith("diffusion_unet.") for k in moved(after[2], "condition_unet.", inside=False))
    assert any(k.startswith("ssformer.") for k in moved(after[2], "condition_unet.", inside=False))

    ema = wf.parser.get_parsed_content("ema")
    assert int(ema.num_updates) == epoch_length  # restarted at the first joint iteration
    log = pd.read_csv(tmp_path / "eval" / "training_log.csv")
    warm, joint = log[log["epoch"] == 1], log[log["epoch"] == 2]
    assert warm["diffusion_loss"].isna().all() and (warm["loss"] == warm["anchor_loss"]).all()
    assert joint["diffusion_loss"].notna().all() and (joint["loss"] > joint["anchor_loss"]).all()
    wf.finalize()
