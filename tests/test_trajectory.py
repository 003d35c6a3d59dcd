"""Tests for ``medsegdiff_bundle.evaluation.trajectory`` (Dice of every sampler step's predicted mask)."""

import pytest
import torch

from medsegdiff_bundle.diffusion.sampler import DiffusionSampler
from medsegdiff_bundle.evaluation import denoising_trajectory, save_trajectory_plot
from tests.test_samplers import OracleNetwork


def _label(num_classes: int) -> torch.Tensor:
    label = torch.zeros(2, 1, 16, 16, dtype=torch.long)
    label[0, 0, 3:9, 4:12] = 1
    label[1, 0, 8:14, 2:7] = num_classes - 1
    return label


class DriftingNetwork(OracleNetwork):
    """Reads the mask perfectly from pure noise (the first step), then predicts background: a chain that drifts."""

    def denoise(self, x_t, timesteps, cond):
        exact = super().denoise(x_t, timesteps, cond)
        first = (timesteps == timesteps.max()).view(-1, *([1] * (x_t.ndim - 1))) & bool(timesteps.max() >= 999)
        return torch.where(first, exact, torch.full_like(exact, -1.0))


@pytest.mark.parametrize("num_classes", [2, 3])
def test_exact_denoiser_scores_one_at_every_step(num_classes):
    label = _label(num_classes)
    sampler = DiffusionSampler("dpmpp", 5, ensemble=2, seed=0)
    table, summary = denoising_trajectory(OracleNetwork(label, num_classes, "linear_beta", "sample"), sampler,
                                          torch.rand(2, 3, 16, 16), label)
    assert list(table["step"]) == list(range(5))
    assert list(table["timestep"]) == sampler.scheduler.timesteps.tolist()
    assert table["dice"].tolist() == pytest.approx([1.0] * 5)
    assert summary["first_step_dice"] == pytest.approx(1.0) and summary["final_dice"] == pytest.approx(1.0)
    # the oracle's anchor is flat, i.e. background after argmax: Dice 0 for each present class; with 3 classes each
    # case also has one class absent from both prediction and reference, which scores 1
    assert summary["anchor_dice"] == pytest.approx(0.0 if num_classes == 2 else 0.5)


def test_trajectory_shows_a_chain_that_drifts_away_from_its_first_reading(tmp_path):
    label = _label(2)
    table, summary = denoising_trajectory(DriftingNetwork(label, 2, "linear_beta", "sample"),
                                          DiffusionSampler("ddim", 4, ensemble=3, seed=0), torch.rand(2, 3, 16, 16), label)
    assert table["dice"].tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0])
    assert summary["first_step_dice"] == pytest.approx(1.0) and summary["best_step_dice"] == pytest.approx(1.0)
    assert summary["final_dice"] == pytest.approx(0.0)
    png = save_trajectory_plot(tmp_path / "trajectory.png", table, summary)
    assert png.stat().st_size > 1000


def test_trajectory_refuses_mismatched_label():
    label = _label(2)
    with pytest.raises(ValueError, match="differ in batch or spatial size"):
        denoising_trajectory(OracleNetwork(label, 2, "linear_beta", "sample"), DiffusionSampler("ddim", 2, 1),
                             torch.rand(2, 3, 16, 16), label[:, :, :8])
