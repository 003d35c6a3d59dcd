"""Schedulers and the sampling loop: timestep ranges, exactness with an oracle denoiser, seeding, ensemble
batching, and the condition model running once per image."""

from __future__ import annotations

import pytest
import torch

from medsegdiff_bundle.diffusion import DiffusionSampler, label_to_x0, make_scheduler
from medsegdiff_bundle.networks import ConditionFeatures
from tests.helpers import tiny_model

T = 1000


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
@pytest.mark.parametrize("steps", [1, 2, 7, 20, 50, 333, 999, 1000])
def test_timesteps_stay_in_training_range(sampler, steps):
    """n distinct, strictly decreasing timesteps in [0, T), starting at T-1 (pure noise)."""
    sched = make_scheduler(sampler, T)
    sched.set_timesteps(steps)
    ts = sched.timesteps
    assert len(ts) == steps
    assert int(ts[0]) == T - 1
    assert int(ts.min()) >= 0 and int(ts.max()) <= T - 1
    assert torch.all(ts[1:] < ts[:-1])


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
@pytest.mark.parametrize("steps", [0, T + 1])
def test_steps_outside_training_range_are_refused(sampler, steps):
    with pytest.raises(ValueError, match="training range"):
        make_scheduler(sampler, T).set_timesteps(steps)


def test_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        make_scheduler("ddim", prediction_type="v")


def test_ddpm_needs_the_full_chain():
    """DDPM with fewer steps would feed wrong timesteps: refused with a pointer to DDIM/DPM-Solver++."""
    with pytest.raises(ValueError, match="use 'ddim' or 'dpmpp'"):
        DiffusionSampler("ddpm", steps=50)


class OracleNetwork(torch.nn.Module):
    """Knows the true mask: returns x0 itself, or the exact noise eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""

    def __init__(self, label: torch.Tensor, num_classes: int, schedule: str, prediction_type: str) -> None:
        super().__init__()
        self.prediction_type = prediction_type
        self.num_classes = num_classes
        self.mask_channels = 1 if num_classes == 2 else num_classes
        self.x0 = label_to_x0(label, num_classes)
        self.abar = make_scheduler("ddpm", T, schedule).alphas_cumprod.double()
        self.condition_calls = 0

    def condition(self, image):
        self.condition_calls += 1
        b = image.shape[0]
        z = torch.zeros(b, self.mask_channels, *image.shape[2:])
        return ConditionFeatures(logits=z, anchor=torch.sigmoid(z), semantic=z)

    def denoise(self, x_t, timesteps, cond):
        n = x_t.shape[0] // self.x0.shape[0]
        x0 = self.x0.repeat_interleave(n, 0).double()
        if self.prediction_type == "sample":
            return x0.float()
        abar = self.abar[timesteps].view(-1, *([1] * (x_t.ndim - 1)))
        return ((x_t.double() - abar.sqrt() * x0) / (1 - abar).sqrt()).float()


@pytest.mark.parametrize("sampler,steps", [("ddim", 5), ("ddim", 20), ("dpmpp", 5), ("dpmpp", 20), ("ddpm", T)])
@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("schedule", ["linear_beta", "cosine"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "sample+round_x0"])
def test_samplers_recover_the_mask_from_an_exact_denoiser(sampler, steps, num_classes, schedule, prediction_type):
    """With the true noise every sampler must land on the true mask (catches wrong coefficients/last steps)."""
    label = torch.zeros(2, 1, 16, 16, dtype=torch.long)
    label[0, 0, 3:9, 4:12] = 1
    label[1, 0, 8:14, 2:7] = num_classes - 1
    prediction_type, _, rounding = prediction_type.partition("+")
    net = OracleNetwork(label, num_classes, schedule, prediction_type)
    sampling = DiffusionSampler(sampler, steps, ensemble=3, schedule=schedule, prediction_type=prediction_type, seed=1,
                                round_x0=rounding == "round_x0")
    result = sampling(net, torch.zeros(2, 1, 16, 16))
    assert result.probs.shape == (2, num_classes, 16, 16)
    assert torch.equal(result.probs.argmax(1, keepdim=True), label)
    assert torch.allclose(result.members, result.members[:1].expand_as(result.members), atol=1e-3)
    assert float(result.uncertainty.max()) < 1e-3
    assert net.condition_calls == 1


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_dpmpp_first_order_step_equals_ddim(prediction_type):
    """DPM-Solver++'s first (first-order) step is algebraically DDIM's deterministic step."""
    ddim, dpm = make_scheduler("ddim", prediction_type=prediction_type), make_scheduler("dpmpp", prediction_type=prediction_type)
    ddim.set_timesteps(20)
    dpm.set_timesteps(20)
    x, eps = torch.randn(2, 1, 8, 8), 0.3 * torch.randn(2, 1, 8, 8)
    t = int(ddim.timesteps[0])
    assert t == int(dpm.timesteps[0]) and int(ddim.timesteps[1]) == int(dpm.timesteps[1])
    ddim.clip_sample = dpm.clip_sample = False
    x_ddim, x0_ddim = ddim.step(eps, t, x)
    x_dpm, x0_dpm = dpm.step(eps, t, x)
    assert torch.allclose(x0_ddim, x0_dpm, atol=1e-4)
    assert torch.allclose(x_ddim, x_dpm, atol=1e-4)


def _count_condition_runs(model):
    calls = {"n": 0}
    model.condition_unet.stem.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    return calls


@pytest.mark.parametrize("sampler,steps", [("dpmpp", 10), ("ddim", 10)])
def test_condition_model_runs_once_per_image_batch(sampler, steps):
    """Sampling 2 images x 4 members x 10 steps runs the condition UNet exactly once and the denoiser 10 times."""
    model = tiny_model().eval()
    cond_calls = _count_condition_runs(model)
    denoise_calls = {"n": 0}
    model.diffusion_unet.stem.register_forward_hook(lambda *_: denoise_calls.__setitem__("n", denoise_calls["n"] + 1))
    result = DiffusionSampler(sampler, steps, ensemble=4)(model, torch.randn(2, 3, 32, 32))
    assert cond_calls["n"] == 1
    assert denoise_calls["n"] == steps
    assert result.members.shape == (4, 2, 2, 32, 32)
    assert result.uncertainty.shape == (2, 1, 32, 32)
    assert torch.allclose(result.probs.sum(1), torch.ones(2, 32, 32), atol=1e-5)


def test_same_seed_same_samples_different_seed_different():
    model = tiny_model().eval()
    image = torch.randn(1, 3, 32, 32)
    a = DiffusionSampler("dpmpp", 5, ensemble=2, seed=7)(model, image)
    b = DiffusionSampler("dpmpp", 5, ensemble=2, seed=7)(model, image)
    c = DiffusionSampler("dpmpp", 5, ensemble=2, seed=8)(model, image)
    assert torch.equal(a.members, b.members)
    assert not torch.equal(a.members, c.members)


def test_ddpm_is_seeded_too():
    """The stochastic DDPM chain draws its per-step noise from the seeded generator."""
    model = tiny_model(channels=(4, 8)).eval()
    image = torch.randn(1, 3, 8, 8)
    a = DiffusionSampler("ddpm", T, ensemble=1, seed=3)(model, image)
    b = DiffusionSampler("ddpm", T, ensemble=1, seed=3)(model, image)
    assert torch.equal(a.members, b.members)


def test_staple_fusion_and_entropy_uncertainty_options():
    model = tiny_model().eval()
    image = torch.randn(1, 3, 32, 32)
    res = DiffusionSampler("ddim", 4, ensemble=3, fusion="staple", uncertainty="entropy")(model, image)
    assert res.probs.shape == (1, 2, 32, 32)
    assert float(res.uncertainty.min()) >= 0 and float(res.uncertainty.max()) <= float(torch.log(torch.tensor(2.0))) + 1e-5
    with pytest.raises(ValueError, match="STAPLE fusion is for binary"):
        DiffusionSampler("ddim", 4, ensemble=2, fusion="staple")(tiny_model(num_classes=3).eval(), image)


def test_round_x0_gives_the_most_probable_mask_in_the_diffusion_encoding():
    from medsegdiff_bundle.diffusion import round_x0

    soft = torch.tensor([[[[0.3, -0.2], [0.0, 1.0]]]])
    assert round_x0(soft, 2).tolist() == [[[[1.0, -1.0], [-1.0, 1.0]]]]
    multi = torch.tensor([[[[0.9]], [[0.1]], [[-0.5]]], [[[-1.0]], [[-0.9]], [[0.2]]]])  # (2, 3, 1, 1)
    assert round_x0(multi, 3)[:, :, 0, 0].tolist() == [[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0]]


class ConstantX0Network(OracleNetwork):
    """Predicts the same soft x0 everywhere and records every noisy input it is given."""

    def __init__(self, value: float) -> None:
        super().__init__(torch.zeros(1, 1, 8, 8, dtype=torch.long), 2, "linear_beta", "sample")
        self.value, self.inputs = value, []

    def denoise(self, x_t, timesteps, cond):
        self.inputs.append(x_t.clone())
        return torch.full_like(x_t, self.value)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_round_x0_feeds_the_solver_a_binary_mask_and_returns_the_soft_prediction(sampler):
    net = ConstantX0Network(0.2)
    result = DiffusionSampler(sampler, 3, ensemble=1, seed=7, round_x0=True)(net, torch.rand(1, 3, 8, 8))
    # what the second step sees is the first solver step taken from x0 = +1 (the rounding of 0.2)
    manual = make_scheduler(sampler, T, "linear_beta", "sample")
    manual.set_timesteps(3)
    x = torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(7))
    assert torch.equal(net.inputs[0], x)
    t0 = manual.timesteps.tolist()[0]
    expected, _ = manual.step(torch.ones_like(x), t0, x)
    assert torch.allclose(net.inputs[1], expected, atol=1e-6)
    unrounded, _ = make_scheduler(sampler, T, "linear_beta", "sample").step(torch.full_like(x, 0.2), t0, x)
    assert not torch.allclose(net.inputs[1], unrounded, atol=1e-3)
    # the output probabilities come from the soft prediction: p = (0.2 + 1) / 2
    assert torch.allclose(result.probs[:, 1], torch.full((1, 8, 8), 0.6), atol=1e-6)


def test_round_x0_needs_x0_prediction():
    with pytest.raises(ValueError, match="round_x0 needs an x0-predicting network"):
        DiffusionSampler("ddim", 4, prediction_type="epsilon", round_x0=True)


@pytest.mark.parametrize("weight,expected", [(0.0, 0.6), (0.25, 0.575), (1.0, 0.5)])
def test_anchor_weight_blends_the_condition_models_segmentation_into_the_result(weight, expected):
    # members predict p = (0.2 + 1) / 2 = 0.6 everywhere; the condition model's anchor is sigmoid(0) = 0.5
    net = ConstantX0Network(0.2)
    image = torch.rand(2, 3, 8, 8)
    plain = DiffusionSampler("dpmpp", 3, ensemble=2, seed=7)(net, image)
    result = DiffusionSampler("dpmpp", 3, ensemble=2, seed=7, anchor_weight=weight)(net, image)
    assert torch.allclose(result.probs[:, 1], torch.full((2, 8, 8), expected), atol=1e-6)
    assert torch.allclose(result.probs.sum(dim=1), torch.ones(2, 8, 8), atol=1e-6)
    # the members and their disagreement are the diffusion ensemble's, whatever the blend
    assert torch.equal(result.members, plain.members)
    assert torch.equal(result.uncertainty, plain.uncertainty)


@pytest.mark.parametrize("weight", [-0.1, 1.5])
def test_anchor_weight_outside_unit_interval_is_refused(weight):
    with pytest.raises(ValueError, match=r"anchor_weight must be in \[0, 1\]"):
        DiffusionSampler("ddim", 4, anchor_weight=weight)
