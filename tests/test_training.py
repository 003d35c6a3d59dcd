"""Learning behaviour on synthetic data: overfitting one image, and fast samplers agreeing with full DDPM."""

from __future__ import annotations

import pytest
import torch

from medsegdiff_bundle.diffusion import DiffusionSampler
from tests.helpers import dice, synthetic_batch, tiny_model, train

pytestmark = pytest.mark.slow


def test_overfits_one_image():
    """A small model trained on one 32x32 image reproduces its mask (Dice > 0.9) with DDIM-20 and DPM-Solver++-20."""
    torch.manual_seed(0)
    image, label = synthetic_batch(1, 32, seed=3)
    model = tiny_model(channels=(16, 32, 64))
    losses = train(model, image, label, iterations=250)
    assert sum(losses[-20:]) / 20 < 0.2 * sum(losses[:20]) / 20
    for sampler in ("ddim", "dpmpp"):
        result = DiffusionSampler(sampler, 20, ensemble=5, seed=0)(model, image)
        assert dice(result.probs, label) > 0.9, sampler


@pytest.fixture(scope="module")
def trained_tiny_model():
    torch.manual_seed(0)
    image, label = synthetic_batch(32, 32, seed=100)
    model = tiny_model(channels=(16, 32, 64))
    # 400 iterations: DDPM-1000 scores 0.91 and the fast samplers lie within 0.006 of it (0.92 and 0.000 after 700,
    # which took 55 s more on a 2-core AVX2 machine)
    train(model, image, label, iterations=400)
    test_image, test_label = synthetic_batch(4, 32, seed=200)
    return model, test_image, test_label


def test_fast_samplers_match_full_ddpm(trained_tiny_model):
    """DDIM and DPM-Solver++ with <= 20 steps reach Dice within 0.05 of 1000-step DDPM on the same held-out images."""
    model, image, label = trained_tiny_model
    reference = dice(DiffusionSampler("ddpm", 1000, ensemble=3, seed=0)(model, image).probs, label)
    assert reference > 0.7, "the tiny model did not learn; the comparison would be meaningless"
    for sampler, steps in (("ddim", 10), ("ddim", 20), ("dpmpp", 10), ("dpmpp", 20)):
        fast = dice(DiffusionSampler(sampler, steps, ensemble=3, seed=0)(model, image).probs, label)
        assert abs(fast - reference) <= 0.05, (sampler, steps, fast, reference)


def test_ensemble_uncertainty_concentrates_on_errors(trained_tiny_model):
    """Members disagree more where the fused prediction is wrong than where it is right."""
    model, image, label = trained_tiny_model
    result = DiffusionSampler("dpmpp", 10, ensemble=5, seed=0)(model, image)
    wrong = result.probs.argmax(1, keepdim=True) != label
    assert wrong.any()
    assert float(result.uncertainty[wrong].mean()) > 2 * float(result.uncertainty[~wrong].mean())


def test_timestep_distribution_follows_the_power():
    """power 1 is the uniform integer draw; power p has density ~ t^(p-1) (mean T * p / (p + 1)); all in [0, T)."""
    from medsegdiff_bundle.diffusion import sample_timesteps

    g = torch.Generator().manual_seed(0)
    uniform = sample_timesteps(20000, 1000, 1.0, generator=g)
    assert torch.equal(uniform, torch.randint(0, 1000, (20000,), generator=torch.Generator().manual_seed(0)))
    for power in (2.0, 3.0, 0.5):
        t = sample_timesteps(20000, 1000, power, generator=torch.Generator().manual_seed(1)).double()
        assert 0 <= t.min() and t.max() <= 999
        assert abs(t.mean().item() - 1000 * power / (power + 1)) < 10, (power, t.mean())
        # the upper quarter gets 1 - 0.75**p of the draws
        assert abs((t >= 750).double().mean().item() - (1 - 0.75**power)) < 0.015
    a = sample_timesteps(8, 1000, 2.0, generator=torch.Generator().manual_seed(5))
    b = sample_timesteps(8, 1000, 2.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.dtype == torch.long
    with pytest.raises(ValueError, match="timestep_power must be > 0"):
        sample_timesteps(4, 1000, 0.0)


def test_training_step_draws_its_timesteps_with_the_power():
    """diffusion_forward hands the loss timesteps from the requested distribution (the iteration passes it on)."""
    from medsegdiff_bundle.diffusion import MedSegDiffLoss, diffusion_forward, make_scheduler
    from medsegdiff_bundle.engine import DiffusionTrainIteration

    seen = []

    class Recording(MedSegDiffLoss):
        def forward(self, prediction, target, anchor_logits, label, timesteps, x0_pred=None, check_label=True):
            seen.append(timesteps)
            return super().forward(prediction, target, anchor_logits, label, timesteps, x0_pred, check_label)

    model = tiny_model()
    image, label = synthetic_batch(16, 16)
    diffusion_forward(model, make_scheduler("ddpm"), Recording(2), image, label, torch.Generator().manual_seed(0), 200.0)
    assert seen[-1].min() >= 900  # P(t < 900) = 0.9**200 per sample
    with pytest.raises(ValueError, match="timestep_power must be > 0"):
        DiffusionTrainIteration(make_scheduler("ddpm"), MedSegDiffLoss(2), timestep_power=-1)
