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


def test_anchor_weight_one_returns_the_condition_models_segmentation(model):
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        anchor_fg = model.condition(image).anchor  # binary: sigmoid of the one anchor channel
    probs = DiffusionSegInferer(steps=2, ensemble=2, anchor_weight="1.0")(image, model)
    assert torch.allclose(probs[:, 1:], anchor_fg, atol=1e-5)
    plain = DiffusionSegInferer(steps=2, ensemble=2)(image, model)
    half = DiffusionSegInferer(steps=2, ensemble=2, anchor_weight=0.5)(image, model)
    assert torch.allclose(half, (plain + probs) / 2, atol=1e-5)


def test_return_anchor_appends_the_condition_models_probabilities_before_the_uncertainty(model):
    image = torch.randn(1, 3, 30, 35)  # padded and cropped back, the anchor too
    with torch.no_grad():
        anchor_fg = model.condition(torch.nn.functional.pad(image, (0, 1, 1, 1), mode="replicate")).anchor
    plain = DiffusionSegInferer(steps=2, ensemble=2)
    both = DiffusionSegInferer(steps=2, ensemble=2, return_anchor=True, return_uncertainty=True)
    probs, out = plain(image, model), both(image, model)
    assert out.shape == (1, 5, 30, 35)
    assert torch.allclose(out[:, :2], probs, atol=1e-6)
    assert torch.allclose(out[:, 3:4], anchor_fg[..., 1:-1, :-1], atol=1e-5)
    assert torch.allclose(out[:, 2:4].sum(1), torch.ones(1, 30, 35), atol=1e-5)
    assert torch.equal(out[:, 2:4], both.last_anchor) and torch.equal(out[:, 4:], both.last_uncertainty)
    assert plain.last_anchor is None  # not carried through sliding windows unless asked for
    assert DiffusionSegInferer(steps=2, ensemble=2, return_anchor=True)(image, model).shape == (1, 4, 30, 35)


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
    for p_net, p_ema in zip(net.parameters(), ema.module.parameters(), strict=True):  # every one of them
        assert torch.allclose(p_ema, p_net - 0.1, atol=1e-6)
    assert int(ema.num_updates) == 1
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_follows_weights_loaded_into_the_model_and_a_copy_averages_on_its_own():
    """The update keeps the model's parameter objects between calls (walking both module trees every step cost host
    time): weights loaded in place must still be what it averages, and a deepcopy must not write into the original."""
    import copy

    net = tiny_model(channels=(4, 8))
    ema = EMAModel(net, decay=0.5)
    for _ in range(20):  # past the warm-up: decay 0.5
        ema.update(net)
    start = [p.clone() for p in ema.module.parameters()]
    target = tiny_model(channels=(4, 8))
    with torch.no_grad():
        for p in target.parameters():
            p.add_(3.0)
    net.load_state_dict(target.state_dict())  # in place: the same Parameter objects, new values
    ema.update(net)
    for s0, p_ema, p_new in zip(start, ema.module.parameters(), target.parameters(), strict=True):
        assert torch.allclose(p_ema, 0.5 * s0 + 0.5 * p_new, atol=1e-6)

    twin = copy.deepcopy(ema)
    before = [p.clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.sub_(5.0)
    twin.update(net)
    assert all(torch.equal(a, b) for a, b in zip(before, ema.module.parameters()))  # the original is untouched
    for s0, p_twin, p_now in zip(before, twin.module.parameters(), net.parameters(), strict=True):
        assert torch.allclose(p_twin, 0.5 * s0 + 0.5 * p_now, atol=1e-6)  # the model as it is now, not a copy

    with pytest.raises(ValueError, match="do not match"):
        ema.update(tiny_model(channels=(8, 16)))


# ---------------------------------------------------------------------------------------- fast-path switches
# On CPU the compile tests use cheap backends: "aot_eager" traces the denoiser (dynamo + AOT autograd, the same
# graph inductor would get) and runs it eagerly; dynamo's CompileCounter counts the compilations. Inductor itself
# costs ~45 s per compile on the 2-core CI machine; tests/test_gpu.py checks it on CUDA.


def _fresh(spatial_dims: int = 2):
    torch.manual_seed(0)
    return tiny_model(spatial_dims).eval()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_channels_last_gives_the_default_probabilities_in_the_default_layout(spatial_dims):
    plain, converted = _fresh(spatial_dims), _fresh(spatial_dims)
    image = torch.randn(2, 3, *(16,) * spatial_dims)
    expected = DiffusionSegInferer(steps=3, ensemble=2, seed=1)(image, plain)
    probs = DiffusionSegInferer(steps=3, ensemble=2, seed=1, channels_last=True)(image, converted)
    assert torch.allclose(probs, expected, atol=1e-5)
    assert probs.stride() == expected.stride() and image.is_contiguous()  # callers see no layout change
    fmt = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
    weight = next(p for p in converted.diffusion_unet.parameters() if p.ndim == spatial_dims + 2 and min(p.shape[1:]) > 1)
    assert weight.is_contiguous(memory_format=fmt) and not weight.is_contiguous()
    assert converted.condition_unet.stem.weight.is_contiguous()  # instance norm: the plain condition UNet stays so
    assert list(converted.state_dict()) == list(plain.state_dict())  # same keys: checkpoints load both ways
    plain.load_state_dict(converted.state_dict())


def test_channels_last_converts_a_network_once(monkeypatch):
    import medsegdiff_bundle.engine.inferer as inferer_module

    calls = []
    convert = inferer_module.to_channels_last
    monkeypatch.setattr(inferer_module, "to_channels_last", lambda net: calls.append(net) or convert(net))
    inferer, net = DiffusionSegInferer(steps=2, ensemble=1, channels_last=True), _fresh()
    for _ in range(3):
        inferer(torch.randn(1, 3, 16, 16), net)
    assert calls == [net]


@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_gives_the_default_probabilities_and_compiles_once():
    from torch._dynamo.testing import CompileCounter

    net = _fresh()
    image = torch.randn(2, 3, 32, 32)
    expected = DiffusionSegInferer(steps=3, ensemble=2, seed=1)(image, net)
    counter = CompileCounter()
    inferer = DiffusionSegInferer(steps=3, ensemble=2, seed=1, compile=True, compile_backend=counter)
    first = inferer(image, net)
    second = inferer(image, net)
    assert counter.frame_count == 1  # one graph (no graph break), compiled on the first call, reused after
    assert torch.equal(first, second)
    assert torch.allclose(first, expected, atol=1e-6)
    traced = DiffusionSegInferer(steps=3, ensemble=2, seed=1, compile=True, compile_backend="aot_eager")(image, net)
    assert torch.allclose(traced, expected, atol=1e-5)


@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_leaves_the_module_as_it_was():
    import copy
    import io

    net = _fresh()
    before = dict(net.__dict__)
    keys = list(net.state_dict())
    DiffusionSegInferer(steps=2, ensemble=1, compile=True, compile_backend="aot_eager")(torch.randn(1, 3, 16, 16), net)
    assert net.__dict__.keys() == before.keys() and "denoise" not in net.__dict__
    assert list(net.state_dict()) == keys  # no "_orig_mod." prefix
    torch.save(net, io.BytesIO())  # still picklable as a whole
    ema = EMAModel(net)
    assert list(ema.module.state_dict()) == keys and type(ema.module) is type(net)
    assert copy.deepcopy(net).denoise.__func__ is type(net).denoise


@pytest.mark.usefixtures("fresh_dynamo")
def test_channels_last_and_compile_together_with_a_batch_of_one():
    """Batch 1, one member: the SS-Former output view had a stride AOT tracing got wrong; the network now copies it."""
    plain, converted = _fresh(), _fresh()
    image = torch.randn(1, 3, 32, 32)
    expected = DiffusionSegInferer(steps=2, ensemble=1)(image, plain)
    fast = DiffusionSegInferer(steps=2, ensemble=1, channels_last=True, compile=True, compile_backend="aot_eager")
    assert torch.allclose(fast(image, converted), expected, atol=1e-5)


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_path_returns_a_meta_tensor_like_the_eager_path():
    from monai.data import MetaTensor

    net = _fresh()
    image = MetaTensor(torch.randn(1, 3, 30, 32), meta={"filename_or_obj": "case.png"})
    eager = DiffusionSegInferer(steps=2, ensemble=2)(image, net)
    compiled = DiffusionSegInferer(steps=2, ensemble=2, compile=True, compile_backend="aot_eager")(image, net)
    assert isinstance(eager, MetaTensor) and isinstance(compiled, MetaTensor)
    assert compiled.meta["filename_or_obj"] == eager.meta["filename_or_obj"] == "case.png"
    assert torch.allclose(compiled.as_tensor(), eager.as_tensor(), atol=1e-5)


def test_fast_path_flags_from_the_command_line_are_parsed():
    inferer = DiffusionSegInferer(channels_last="false", compile="true")
    assert inferer.channels_last is False and inferer.compile is True
    with pytest.raises(ValueError, match="channels_last"):
        DiffusionSegInferer(channels_last="maybe")


def test_the_network_gets_plain_tensors_and_the_caller_its_meta_tensor_back():
    """MetaTensor's per-op Python (__torch_function__) stays out of the sampling loop; the output keeps the meta."""
    from monai.data import MetaTensor

    net = _fresh()
    seen = []
    handle = net.diffusion_unet.stem.register_forward_hook(lambda module, args, out: seen.append(type(args[0])))
    try:
        image = MetaTensor(torch.randn(1, 3, 32, 32), meta={"filename_or_obj": "case.png"})
        out = DiffusionSegInferer(steps=2, ensemble=2)(image, net)
    finally:
        handle.remove()
    assert seen and all(t is torch.Tensor for t in seen)
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "case.png"
