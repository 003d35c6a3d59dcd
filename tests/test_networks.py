"""MedSegDiff-V2 network: shapes, gradient flow, NBP-Filter behaviour, ablation switches, input checks."""

from __future__ import annotations

import pytest
import torch

from medsegdiff_bundle.diffusion import MedSegDiffLoss, diffusion_forward, make_scheduler
from medsegdiff_bundle.networks import MedSegDiffV2, NeuralBandPassFilter, PlainUNet
from tests.helpers import synthetic_batch, tiny_model


@pytest.mark.parametrize(
    "spatial_dims,num_classes,size,in_channels",
    [(2, 2, 32, 3), (2, 4, 32, 1), (3, 2, 16, 1), (3, 3, 16, 4)],
)
def test_output_shapes(spatial_dims, num_classes, size, in_channels):
    """Noise prediction and anchor logits have the mask's channels (1 for binary, K otherwise) and full size."""
    model = tiny_model(spatial_dims, in_channels, num_classes)
    m = 1 if num_classes == 2 else num_classes
    assert model.mask_channels == m
    image = torch.randn(2, in_channels, *(size,) * spatial_dims)
    x_t = torch.randn(2, m, *(size,) * spatial_dims)
    eps, logits = model(x_t, image, torch.tensor([0, 999]))
    assert eps.shape == x_t.shape
    assert logits.shape == x_t.shape
    cond = model.condition(image)
    assert cond.semantic.shape == (2, 32, *(size // 4,) * spatial_dims)
    assert torch.allclose(model.denoise(x_t, torch.tensor([0, 999]), cond), eps)


def test_any_width_and_depth():
    """Widths and depth are whatever the caller asks for (no hard-coded 128 channels)."""
    model = MedSegDiffV2(2, 3, 2, channels=(12, 24, 48, 96, 96), num_res_blocks=2)
    eps, _ = model(torch.randn(1, 1, 32, 32), torch.randn(1, 3, 32, 32), torch.tensor([5]))
    assert eps.shape == (1, 1, 32, 32)
    assert model.divisor == 16


def _one_backward(model: MedSegDiffV2, spatial_dims: int = 2, size: int = 32):
    image, label = synthetic_batch(2, size, spatial_dims, model.num_classes, model.in_channels)
    loss = diffusion_forward(model, make_scheduler("ddpm"), MedSegDiffLoss(model.num_classes), image, label)["loss"]
    loss.backward()


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("backbone", ["plain", "residual"])
def test_gradients_reach_every_part(spatial_dims, backbone):
    """One backward pass puts non-zero gradients on C, the Gaussian's centre and width, the U-SA gate, the
    SS-Former and the NBP-Filter's output layer."""
    model = tiny_model(spatial_dims, 1 if spatial_dims == 3 else 3, condition_backbone=backbone)
    _one_backward(model, spatial_dims, 32 if spatial_dims == 2 else 16)

    def nonzero(p):
        return p.grad is not None and p.grad.abs().sum() > 0

    assert all(nonzero(p) for n, p in model.condition_unet.named_parameters() if "weight" in n)
    assert nonzero(model.anchor.smooth.mu) and nonzero(model.anchor.smooth.log_sigma)
    assert nonzero(model.anchor.gate.weight)
    block = model.ssformer.blocks[0]
    for unit in (block.attn_noise_to_sem, block.attn_sem_to_noise):
        assert nonzero(unit.to_q.weight) and nonzero(unit.to_k.weight) and nonzero(unit.to_out.weight)
        assert nonzero(unit.nbp.w_out.weight)
    assert nonzero(block.ffn_noise[1].weight) and nonzero(block.ffn_sem[1].weight)


@pytest.mark.parametrize("spatial_dims,shape", [(2, (8, 8)), (2, (7, 5)), (3, (4, 6, 5))])
def test_nbp_filter_is_identity_at_init(spatial_dims, shape):
    """H(omega, tau) == 1 everywhere at initialisation, for any timestep embedding and grid (odd sizes too)."""
    nbp = NeuralBandPassFilter(channels=16, temb_channels=32, spatial_dims=spatial_dims)
    mask = nbp(torch.randn(3, 32) * 5, shape)
    freq = (*shape[:-1], shape[-1] // 2 + 1)
    assert mask.shape == (3, 16, *freq)
    assert torch.equal(mask, torch.ones_like(mask))


def test_nbp_filter_depends_on_timestep_after_a_training_step():
    """After one optimiser step on the diffusion loss the filter is no longer 1 and differs between timesteps."""
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _one_backward(model)
    opt.step()
    nbp = model.ssformer.blocks[0].attn_sem_to_noise.nbp
    with torch.no_grad():
        tau = model.time_embed(torch.tensor([10, 900]))
        mask = nbp(tau, (8, 8))
    assert not torch.allclose(mask, torch.ones_like(mask))
    assert (mask[0] - mask[1]).abs().max() > 1e-6


def _shared_weights(src: MedSegDiffV2, dst: MedSegDiffV2) -> MedSegDiffV2:
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    assert not missing, f"ablated model has parameters the full one lacks: {missing}"
    return dst


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _perturb_zero_inits(model: MedSegDiffV2) -> None:
    """Give zero-initialised layers (NBP output) non-trivial values, as training would."""
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, NeuralBandPassFilter):
            torch.nn.init.normal_(m.w_out.weight, std=0.5)


@pytest.mark.parametrize(
    "full,ablated",
    [
        ({"anchor": "usa"}, {"anchor": "sa"}),
        ({"anchor": "sa"}, {"anchor": "none"}),
        ({"semantic": "ssformer"}, {"semantic": "ssformer_nofilter"}),
        ({"semantic": "ssformer_nofilter"}, {"semantic": "none"}),
    ],
)
def test_ablation_switch_removes_its_module(full, ablated):
    """Each switch drops parameters, and with all shared weights equal the outputs differ."""
    big = tiny_model(**full)
    _perturb_zero_inits(big)
    small = _shared_weights(big, tiny_model(**ablated))
    assert _params(small) < _params(big)
    image, x_t = torch.randn(2, 3, 32, 32), torch.randn(2, 1, 32, 32)
    t = torch.tensor([100, 700])
    with torch.no_grad():
        assert not torch.allclose(big(x_t, image, t)[0], small(x_t, image, t)[0], atol=1e-6)
    if ablated.get("anchor") == "none":
        assert small.anchor is None
    if ablated.get("semantic") == "none":
        assert small.ssformer is None
    if ablated.get("semantic") == "ssformer_nofilter":
        assert all(b.attn_sem_to_noise.nbp is None for b in small.ssformer.blocks)


def test_nofilter_equals_filter_at_init():
    """With H == 1 at initialisation the SS-Former with and without NBP-Filter compute the same thing."""
    big = tiny_model(semantic="ssformer")
    small = _shared_weights(big, tiny_model(semantic="ssformer_nofilter"))
    image, x_t = torch.randn(1, 3, 32, 32), torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(big(x_t, image, torch.tensor([3]))[0], small(x_t, image, torch.tensor([3]))[0], atol=1e-5)


def test_usa_gate_shapes_and_residual():
    """The U-SA output is f_d * (1 + sigmoid(.)): between f_d and 2 f_d for positive features."""
    model = tiny_model()
    feature = torch.rand(2, 8, 32, 32) + 0.1
    out = model.anchor(feature, torch.rand(2, 1, 32, 32))
    assert out.shape == feature.shape
    assert torch.all(out > feature) and torch.all(out < 2 * feature)


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"image": torch.randn(1, 2, 32, 32)}, "image has 2 channels, the network expects 3"),
        ({"image": torch.randn(1, 3, 30, 32)}, "not divisible by 4"),
        ({"image": torch.randn(1, 3, 32, 32, 32)}, "spatial_dims=2"),
        ({"x_t": torch.randn(1, 1, 16, 16)}, "differ in batch or spatial size"),
        ({"x_t": torch.randn(1, 2, 32, 32)}, "noisy mask x_t has 2 channels"),
    ],
)
def test_bad_input_is_refused(bad, match):
    """Wrong channels, wrong dimensionality, mismatched sizes and indivisible sizes give clear errors."""
    model = tiny_model()
    inputs = {"x_t": torch.randn(1, 1, 32, 32), "image": torch.randn(1, 3, 32, 32)}
    inputs.update(bad)
    with pytest.raises(ValueError, match=match):
        model(inputs["x_t"], inputs["image"], torch.tensor([1]))


def test_bad_label_is_refused():
    """Labels outside the class range and label/image size mismatch are refused before the forward pass."""
    model = tiny_model(num_classes=3)
    image = torch.randn(2, 3, 32, 32)
    sched, loss = make_scheduler("ddpm"), MedSegDiffLoss(3)
    with pytest.raises(ValueError, match=r"values span \[3, 3\] but num_classes=3 allows 0..2"):
        diffusion_forward(model, sched, loss, image, torch.full((2, 1, 32, 32), 3))
    with pytest.raises(ValueError, match="differ in batch or spatial size"):
        diffusion_forward(model, sched, loss, image, torch.zeros(2, 1, 16, 16, dtype=torch.long))


@pytest.mark.parametrize("kwargs,match", [({"anchor": "gauss"}, "anchor must be one of"),
                                          ({"semantic": "fft"}, "semantic must be one of"),
                                          ({"num_classes": 1}, "num_classes counts the background"),
                                          ({"condition_channels": (8, 16, 32)}, "as many levels as channels"),
                                          ({"condition_backbone": "resnet"}, "condition_backbone must be one of")])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MedSegDiffV2(**{"spatial_dims": 2, "in_channels": 3, "num_classes": 2, "channels": (8, 16), **kwargs})


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_wider_condition_unet_feeds_the_diffusion_unet_through_a_projection(spatial_dims):
    model = tiny_model(spatial_dims, 1 if spatial_dims == 3 else 3, condition_channels=(16, 32, 64))
    assert tuple(model.condition_unet.channels) == (16, 32, 64) and tuple(model.diffusion_unet.channels) == (8, 16, 32)
    size = 32 if spatial_dims == 2 else 16
    image = torch.randn(2, model.in_channels, *[size] * spatial_dims)
    cond = model.condition(image)
    # c0 arrives at the diffusion UNet's bottleneck width (tiny: 32), not the condition UNet's (64)
    assert cond.semantic.shape == (2, 32, *[size // 4] * spatial_dims)
    _one_backward(model, spatial_dims, size)
    assert model.semantic_proj.weight.grad.abs().sum() > 0


def test_equal_or_default_condition_widths_keep_the_state_dict_keys():
    default = tiny_model().state_dict()
    same = tiny_model(condition_channels=(8, 16, 32)).state_dict()
    assert list(default) == list(same) and not any(k.startswith("semantic_proj") for k in default)
    # without a semantic path there is nothing to project, whatever the widths
    plain = tiny_model(semantic="none", condition_channels=(16, 32, 64))
    assert plain.semantic_proj is None


@pytest.mark.parametrize("spatial_dims,size", [(2, 32), (3, 16)])
def test_condition_backbones_hand_over_the_same_features(spatial_dims, size):
    """Both condition backbones give full-size anchor logits and a bottleneck c0 at the diffusion UNet's stride, for
    any depth; the default is the nnU-Net-style plain UNet (instance norm, no GroupNorm, no time input)."""
    in_channels = 1 if spatial_dims == 3 else 3
    image = torch.randn(2, in_channels, *[size] * spatial_dims)
    for channels in [(8, 16), (8, 16, 32, 32)]:
        for backbone in ("plain", "residual"):
            model = tiny_model(spatial_dims, in_channels, channels=channels, condition_backbone=backbone)
            cond = model.condition(image)
            assert cond.logits.shape == (2, 1, *[size] * spatial_dims)
            stride = 2 ** (len(channels) - 1)
            assert cond.semantic.shape == (2, channels[-1], *[size // stride] * spatial_dims)
            assert model.condition_unet.divisor == model.divisor
    default = tiny_model(spatial_dims, in_channels)
    assert isinstance(default.condition_unet, PlainUNet) and default.condition_backbone == "plain"
    norms = [type(m) for m in default.condition_unet.modules() if "Norm" in type(m).__name__]
    assert norms and set(norms) == {torch.nn.InstanceNorm2d if spatial_dims == 2 else torch.nn.InstanceNorm3d}


def test_plain_unet_learns_to_segment_a_synthetic_shape():
    """Trained alone on the anchor loss, the plain condition UNet segments the synthetic blobs it was shown."""
    torch.manual_seed(0)
    image, label = synthetic_batch(16, 32, num_classes=2, seed=3)
    net = PlainUNet(2, 3, 1, (8, 16, 32))
    loss_fn = MedSegDiffLoss(2).anchor_loss
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(60):
        loss = loss_fn(net(image), label.float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = net(image) > 0
    truth = label.bool()
    assert float(2 * (pred & truth).sum() / (pred.sum() + truth.sum())) > 0.9


@pytest.mark.parametrize("prefix", ["", "module."])
def test_weights_of_the_other_condition_backbone_are_refused_by_name(prefix):
    """A checkpoint of bundle < 0.4.0 (residual condition UNet) loaded into the default network names the setting to
    change, instead of listing a hundred missing keys; the matching backbone loads."""
    old = tiny_model(condition_backbone="residual")
    state = {prefix + k: v for k, v in old.state_dict().items()}
    with pytest.raises(ValueError, match="condition_backbone='residual'"):
        tiny_model().load_state_dict(state)
    if not prefix:
        again = tiny_model(condition_backbone="residual")
        again.load_state_dict(state)
        assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), state.values()))
        with pytest.raises(ValueError, match="condition_backbone='plain'"):
            again.load_state_dict(tiny_model().state_dict())


# ------------------------------------------------- values kept between sampler steps (cached_for_inference)
def _denoise_twice(model: MedSegDiffV2, image: torch.Tensor, x: torch.Tensor, t: torch.Tensor, amp: bool):
    """Two no-grad denoiser calls on one condition (the second may use the kept values) and a reference call with
    gradients on (nothing kept), all under the same autocast setting."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        with torch.no_grad():
            cond = model.condition(image)
            first, second = model.denoise(x, t, cond), model.denoise(x, t, cond)
        with torch.enable_grad():
            reference = model.denoise(x, t, model.condition(image)).detach()
    return first, second, reference


@pytest.mark.parametrize("amp", [False, True])
def test_values_kept_between_sampler_steps_change_nothing_and_follow_new_weights_and_images(amp):
    """GroupNorm's bf16 affine, the NBP-Filter's frequency features and the U-SA gate are computed once per image
    and weights in sampling; the outputs must be exactly those of the full computation, after an in-place weight
    change (an optimiser step, a loaded checkpoint) and for a new image whose tensor may reuse the old one's memory."""
    torch.manual_seed(0)
    model = tiny_model().eval()
    _perturb_zero_inits(model)
    image, _ = synthetic_batch(2, 32, seed=1)
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([10, 700])
    first, second, reference = _denoise_twice(model, image, x, t, amp)
    assert torch.equal(first, reference) and torch.equal(second, reference)
    with torch.no_grad():  # in place, as an optimiser step or load_state_dict changes weights
        for p in model.parameters():
            p.mul_(1.05).add_(0.01)
    first, second, reference = _denoise_twice(model, image, x, t, amp)
    assert torch.equal(first, reference) and torch.equal(second, reference)
    other, _ = synthetic_batch(2, 32, seed=2)
    first, second, reference = _denoise_twice(model, other, x, t, amp)
    assert torch.equal(first, reference) and torch.equal(second, reference)


def test_a_network_that_has_sampled_still_saves_and_copies_whole():
    """The kept values live outside the modules, so torch.save / deepcopy of the whole network still work."""
    import copy
    import io

    torch.manual_seed(0)
    model = tiny_model().eval()
    image, _ = synthetic_batch(2, 32, seed=1)
    first, _, _ = _denoise_twice(model, image, torch.randn(2, 1, 32, 32), torch.tensor([10, 700]), amp=True)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    twin = copy.deepcopy(model)
    assert buffer.tell() > 0 and all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_sampler_steps_after_the_first_run_fewer_operators():
    """The point of keeping them: fewer operators per denoiser call, each of them host time in the eager loop."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = tiny_model().eval()
    image, _ = synthetic_batch(2, 32, seed=1)
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([10, 700])

    def operators(grad: bool) -> int:
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
            cond = model.condition(image)
            model.denoise(x, t, cond)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                model.denoise(x, t, cond)
        return sum(1 for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::"))

    kept, full = operators(False), operators(True)
    assert kept < 0.9 * full, (kept, full)


def test_a_trace_after_sampling_keeps_the_size_and_weight_dependence():
    """A TorchScript trace (bundle export) of a network that has sampled must not freeze a kept value into the
    graph: at another size and after new weights it still matches the eager network."""
    from medsegdiff_bundle.export import trace_network

    torch.manual_seed(0)
    model = tiny_model().eval()
    _perturb_zero_inits(model)
    image, _ = synthetic_batch(2, 32, seed=1)
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([10, 700])
    _denoise_twice(model, image, x, t, amp=False)  # the kept values exist now, for size 32
    traced = trace_network(model, 2, 3, 32)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)
        big, _ = synthetic_batch(2, 48, seed=3)
        xb = torch.randn(2, 1, 48, 48)
        for got, want in zip(traced(xb, big, t), model(xb, big, t), strict=True):  # noise and anchor logits
            assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_group_norm_trains_channels_last_bf16_on_cpu_through_the_contiguous_kernel(spatial_dims, monkeypatch):
    """CPU training under bf16 autocast hands GroupNorm's kernel a contiguous tensor (torch's channels-last backward
    is many times slower there) and gives the caller back its channels-last layout, with the values and gradients of
    the direct call. Without autograd (sampling) the kernel sees the channels-last tensor itself."""
    import torch.nn.functional as F

    from medsegdiff_bundle.networks import blocks

    fmt = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
    norm = blocks.GroupNorm(4, 16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 16, *(6,) * spatial_dims).to(torch.bfloat16).contiguous(memory_format=fmt)
    grad = torch.randn_like(x)
    kernel_inputs = []
    real_group_norm = F.group_norm

    def recording(inp, *args, **kwargs):
        kernel_inputs.append(inp.is_contiguous())
        return real_group_norm(inp, *args, **kwargs)

    monkeypatch.setattr(blocks.F, "group_norm", recording)
    x_ours = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x_ours)
    y.backward(grad)
    assert kernel_inputs == [True]
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=fmt) and not y.is_contiguous()

    weight, bias = (p.detach().to(torch.bfloat16).requires_grad_(True) for p in (norm.weight, norm.bias))
    x_direct = x.clone().requires_grad_(True)
    expected = real_group_norm(x_direct, 4, weight, bias, norm.eps)
    expected.backward(grad)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(x_ours.grad, x_direct.grad)
    torch.testing.assert_close(norm.weight.grad, weight.grad.float(), rtol=2e-2, atol=2e-2)

    kernel_inputs.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        sampled = norm(x)
    assert kernel_inputs == [False] and sampled.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(sampled, expected.detach())


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_channels_last_network_runs_its_instance_norm_condition_unet_contiguous(spatial_dims):
    """In a channels-last network the plain condition UNet's instance norms see contiguous tensors (a channels-last
    one would be copied in and out by every norm), the condition features come back channels-last for the denoiser,
    and the loss and gradients are those of the all-contiguous network."""
    from medsegdiff_bundle.engine import to_channels_last

    fmt = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
    torch.manual_seed(0)
    plain = tiny_model(spatial_dims)
    fast = to_channels_last(tiny_model(spatial_dims))
    fast.load_state_dict(plain.state_dict())
    norm_inputs: list[bool] = []
    for module in fast.condition_unet.modules():
        if isinstance(module, (torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d)):
            module.register_forward_hook(lambda m, args, out: norm_inputs.append(args[0].is_contiguous()))
    image, label = synthetic_batch(2, 16, spatial_dims, seed=1)
    image_cl = image.contiguous(memory_format=fmt)
    assert image_cl.is_contiguous(memory_format=fmt) and not image_cl.is_contiguous()

    cond = fast.condition(image_cl)
    assert norm_inputs and all(norm_inputs)
    for name in ("logits", "anchor"):
        assert getattr(cond, name).is_contiguous(memory_format=fmt), name
    reference = plain.condition(image)
    torch.testing.assert_close(cond.logits, reference.logits)
    torch.testing.assert_close(cond.semantic, reference.semantic)

    losses = []
    for net, x in ((plain, image), (fast, image_cl)):
        gen = torch.Generator().manual_seed(5)
        out = diffusion_forward(net, make_scheduler("ddpm", 100), MedSegDiffLoss(2), x, label, generator=gen)
        out["loss"].backward()
        losses.append(out["loss"])
    torch.testing.assert_close(losses[1], losses[0])
    for (name, p_plain), p_fast in zip(plain.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(p_fast.grad, p_plain.grad, rtol=1e-4, atol=1e-5, msg=name)
