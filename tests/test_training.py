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
    losses = train(model, image, label, iterations=400)
    assert sum(losses[-20:]) / 20 < 0.2 * sum(losses[:20]) / 20
    for sampler in ("ddim", "dpmpp"):
        result = DiffusionSampler(sampler, 20, ensemble=5, seed=0)(model, image)
        assert dice(result.probs, label) > 0.9, sampler


@pytest.fixture(scope="module")
def trained_tiny_model():
    torch.manual_seed(0)
    image, label = synthetic_batch(32, 32, seed=100)
    model = tiny_model(channels=(16, 32, 64))
    train(model, image, label, iterations=700)
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
