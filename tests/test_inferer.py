"""DiffusionSegInferer: MONAI's inferer contract (probabilities back), padding, sliding window, uncertainty."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import Inferer

from medsegdiff_bundle.engine import DiffusionSegInferer, EMAModel
from tests.helpers import tiny_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_model().eval()


def test_is_a_monai_inferer_and_returns_class_probabilities(model):
    inferer = DiffusionSegInferer(steps=3, ensemble=2)
    assert isinstance(inferer, Inferer)
    probs = inferer(torch.randn(2, 3, 32, 32), model)
    assert probs.shape == (2, 2, 32, 32)
    assert torch.allclose(probs.sum(1), torch.ones(2, 32, 32), atol=1e-5)
    assert inferer.last_uncertainty.shape == (2, 1, 32, 32)


def test_sizes_the_network_cannot_divide_are_padded_and_cropped_back(model):
    probs = DiffusionSegInferer(steps=2, ensemble=1)(torch.randn(1, 3, 30, 35), model)
    assert probs.shape == (1, 2, 30, 35)


def test_return_uncertainty_appends_one_channel(model):
    inferer = DiffusionSegInferer(steps=2, ensemble=3, return_uncertainty=True)
    out = inferer(torch.randn(1, 3, 32, 32), model)
    assert out.shape == (1, 3, 32, 32)
    assert torch.equal(out[:, -1:], inferer.last_uncertainty)
    assert float(out[:, -1].min()) >= 0


def test_sliding_window_runs_the_whole_sampler_per_window(model):
    calls = {"n": 0}
    handle = model.condition_unet.stem.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    try:
        probs = DiffusionSegInferer(steps=2, ensemble=2, roi_size=32, overlap=0.25)(torch.randn(1, 3, 48, 40), model)
    finally:
        handle.remove()
    assert probs.shape == (1, 2, 48, 40)
    assert calls["n"] == 4  # 2 x 2 windows of 32 over 48 x 40, the condition model once per window
    assert torch.allclose(probs.sum(1), torch.ones(1, 48, 40), atol=1e-4)


def test_input_smaller_than_roi_runs_once_without_windows(model):
    probs = DiffusionSegInferer(steps=2, ensemble=1, roi_size=[64, 64])(torch.randn(1, 3, 32, 32), model)
    assert probs.shape == (1, 2, 32, 32)


def test_accepts_wrapped_networks_and_restores_training_mode(model):
    ema = EMAModel(model, decay=0.9)
    net = tiny_model()
    net.train()
    DiffusionSegInferer(steps=2, ensemble=1)(torch.randn(1, 3, 32, 32), net)
    assert net.training
    probs = DiffusionSegInferer(steps=2, ensemble=1)(torch.randn(1, 3, 32, 32), ema)
    assert probs.shape == (1, 2, 32, 32)


def test_refuses_a_network_that_is_not_medsegdiff():
    with pytest.raises(TypeError, match="MedSegDiffV2-like network"):
        DiffusionSegInferer(steps=2)(torch.randn(1, 3, 32, 32), torch.nn.Conv2d(3, 2, 1))


def test_same_seed_same_output(model):
    image = torch.randn(1, 3, 32, 32)
    a = DiffusionSegInferer(steps=3, ensemble=2, seed=4)(image, model)
    b = DiffusionSegInferer(steps=3, ensemble=2, seed=4)(image, model)
    assert torch.equal(a, b)


def test_ema_tracks_the_model_with_warmup():
    net = tiny_model(channels=(4, 8))
    ema = EMAModel(net, decay=0.999)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net)  # first decay is min(0.999, 1/10) = 0.1: the average moves 90% of the way
    p_net = next(net.parameters())
    p_ema = next(ema.module.parameters())
    assert torch.allclose(p_ema, p_net - 0.1, atol=1e-6)
    assert int(ema.num_updates) == 1
    assert not any(p.requires_grad for p in ema.module.parameters())
