"""Tests for ``medsegdiff_bundle.evaluation.anchor_blend`` (scoring anchor blends of one sampling run)."""

import pytest
import torch

from medsegdiff_bundle.diffusion.sampler import DiffusionSampler
from medsegdiff_bundle.evaluation import anchor_weight_sweep
from medsegdiff_bundle.networks.medsegdiff import ConditionFeatures
from tests.test_samplers import OracleNetwork


def _label() -> torch.Tensor:
    label = torch.zeros(2, 1, 16, 16, dtype=torch.long)
    label[0, 0, 3:9, 4:12] = 1
    label[1, 0, 8:14, 2:7] = 1
    return label


class ExactAnchorNetwork(OracleNetwork):
    """A condition model that is right (confident logits on the true mask) and a denoiser that sees only background."""

    def condition(self, image):
        self.condition_calls += 1
        logits = 10.0 * self.x0  # the true mask as {-1, 1}
        return ConditionFeatures(logits=logits, anchor=torch.sigmoid(logits), semantic=logits)

    def denoise(self, x_t, timesteps, cond):
        return torch.full_like(x_t, -1.0)


def _network(label: torch.Tensor) -> ExactAnchorNetwork:
    return ExactAnchorNetwork(label, 2, "linear_beta", "sample")


def test_sweep_scores_each_blend_and_picks_the_smallest_best_weight():
    label = _label()
    # the sampler's own blend must not leak into the sweep: it starts from the plain ensemble
    sampler = DiffusionSampler("ddim", 3, ensemble=2, seed=0, anchor_weight=1.0)
    table, best = anchor_weight_sweep(_network(label), sampler, torch.rand(2, 3, 16, 16), label)
    assert table["anchor_weight"].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    # foreground probability of a blend: w * sigmoid(10) (just under w), so it wins only for w > 0.5
    assert table["dice"].tolist() == pytest.approx([0.0, 0.0, 0.0, 1.0, 1.0])
    assert best == 0.75


def test_sweep_with_a_correct_ensemble_keeps_the_anchor_out():
    label = _label()
    table, best = anchor_weight_sweep(OracleNetwork(label, 2, "linear_beta", "sample"),
                                      DiffusionSampler("dpmpp", 3, ensemble=2, seed=0), torch.rand(2, 3, 16, 16), label,
                                      weights=[1.0, 0.0, 0.4])
    # the oracle's anchor is flat (sigmoid 0 = 0.5): a blend up to 0.4 still follows the exact ensemble
    assert table["anchor_weight"].tolist() == [0.0, 0.4, 1.0]
    assert table["dice"].tolist() == pytest.approx([1.0, 1.0, 0.0])
    assert best == 0.0


@pytest.mark.parametrize("weights,match", [([], "at least one"), ([0.5, 1.2], r"in \[0, 1\]")])
def test_sweep_refuses_bad_weights(weights, match):
    label = _label()
    with pytest.raises(ValueError, match=match):
        anchor_weight_sweep(_network(label), DiffusionSampler("ddim", 2, 1), torch.rand(2, 3, 16, 16), label, weights)


def test_sweep_refuses_a_mismatched_label():
    label = _label()
    with pytest.raises(ValueError, match="differ in batch or spatial size"):
        anchor_weight_sweep(_network(label), DiffusionSampler("ddim", 2, 1), torch.rand(2, 3, 16, 16), label[:1])
