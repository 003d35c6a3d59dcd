"""Fast-path switches outside the inferer: the channels-last helper and the training iteration's ``channels_last``
and ``compile`` options (compiled with the cheap "aot_eager" backend on CPU; inductor is checked in test_gpu.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from ignite.engine import Events
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer

from medsegdiff_bundle.diffusion import DiffusionSampler, MedSegDiffLoss, make_scheduler
from medsegdiff_bundle.engine import (
    COMPILE_MODES,
    CompiledNetwork,
    DiffusionSegInferer,
    DiffusionTrainIteration,
    EMAModel,
    bf16_is_fast,
    compile_network_calls,
    replays_cudagraphs,
    to_channels_last,
    without_cudagraphs,
)
from tests.helpers import synthetic_batch, tiny_model


@pytest.mark.parametrize("spatial_dims, fmt", [(2, torch.channels_last), (3, torch.channels_last_3d)])
def test_to_channels_last_converts_kernels_in_place_and_keeps_everything_else(spatial_dims, fmt):
    net = tiny_model(spatial_dims)
    params = {name: p for name, p in net.named_parameters()}
    values = {name: p.detach().clone() for name, p in params.items()}
    assert to_channels_last(net) is net
    for name, p in net.named_parameters():
        assert p is params[name]  # same Parameter objects: an optimiser built before still steps them
        assert torch.equal(p, values[name])
        if p.ndim == spatial_dims + 2:
            # the plain condition UNet (instance norm) stays contiguous, everything else is converted
            assert p.is_contiguous() if name.startswith("condition_unet.") else p.is_contiguous(memory_format=fmt), name
    assert net.condition_unet.stem.weight.is_contiguous() and not net.condition_unet.stem.weight.is_contiguous(
        memory_format=fmt)
    assert list(net.state_dict()) == list(tiny_model(spatial_dims).state_dict())
    # a network already converted whole (Module.to) gets the plain condition UNet back contiguous
    again = to_channels_last(tiny_model(spatial_dims).to(memory_format=fmt))
    assert again.condition_unet.stem.weight.is_contiguous()
    assert not again.condition_unet.stem.weight.is_contiguous(memory_format=fmt)


def test_to_channels_last_converts_the_residual_condition_unet_and_a_plain_one_with_group_norm():
    """Only instance norm keeps a network contiguous: the residual backbone (GroupNorm) and a plain UNet built with
    another norm are converted like the rest."""
    from medsegdiff_bundle.networks import PlainUNet

    residual = to_channels_last(tiny_model(condition_backbone="residual"))
    assert residual.condition_unet.stem.weight.is_contiguous(memory_format=torch.channels_last)
    grouped = to_channels_last(PlainUNet(2, 3, 2, (8, 16), norm_name=("group", {"num_groups": 4})))
    assert not grouped.keeps_contiguous_layout
    assert grouped.stem.weight.is_contiguous(memory_format=torch.channels_last)


def test_to_channels_last_can_be_switched_off_from_a_config():
    net = tiny_model()
    assert to_channels_last(net, enabled="false") is net
    assert net.condition_unet.stem.weight.is_contiguous()
    with pytest.raises(ValueError, match="spatial_dims 2 and 3"):
        to_channels_last(torch.nn.Conv1d(2, 2, 3), spatial_dims=1)


def _train(channels_last: bool = False, compile: bool = False, iterations: int = 2,
           seen_inputs: list | None = None) -> tuple[torch.nn.Module, list]:
    """``iterations`` SupervisedTrainer steps (SGD, so that updates stay linear in the gradients and comparable);
    ``seen_inputs`` collects the types of the tensors the condition network's stem receives."""
    torch.manual_seed(0)
    net = tiny_model()
    if seen_inputs is not None:
        net.condition_unet.stem.register_forward_hook(lambda module, args, out: seen_inputs.append(type(args[0])))
    if channels_last:
        to_channels_last(net)
    image, label = synthetic_batch(4, 32, seed=7)
    # MetaTensors, as the bundle's data loader delivers them
    batches = [{"image": MetaTensor(image[2 * i: 2 * i + 2]), "label": MetaTensor(label[2 * i: 2 * i + 2])}
               for i in range(iterations)]
    iteration = DiffusionTrainIteration(make_scheduler("ddpm"), MedSegDiffLoss(2), seed=3, channels_last=channels_last,
                                        compile=compile, compile_backend="aot_eager")
    losses: list[float] = []
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=batches, network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=MedSegDiffLoss(2),
        iteration_update=iteration, amp=False, decollate=False,
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    trainer.run()
    return net, losses


@pytest.mark.usefixtures("fresh_dynamo")
def test_training_iteration_switches_give_the_default_losses_and_weights():
    from torch._dynamo.utils import counters

    plain, plain_losses = _train()
    for options in ({"channels_last": True}, {"compile": True}, {"channels_last": True, "compile": True}):
        torch._dynamo.reset()
        counters.clear()
        net, losses = _train(**options)
        # compiled: one graph for both iterations (no graph break, no recompilation); else nothing compiled
        assert counters["stats"]["unique_graphs"] == (1 if options.get("compile") else 0), options
        assert losses == pytest.approx(plain_losses, rel=1e-4, abs=1e-5), options
        for (name, a), (_, b) in zip(plain.named_parameters(), net.named_parameters()):
            assert torch.allclose(a, b, atol=1e-5), (options, name)
        assert list(net.state_dict()) == list(plain.state_dict()), options  # no "_orig_mod." prefix
        assert list(EMAModel(net).state_dict()) == list(EMAModel(plain).state_dict())


def test_training_iteration_hands_the_network_plain_tensors():
    """The data loader's MetaTensors are unwrapped: their per-op Python would run in every forward."""
    seen: list = []
    _train(iterations=1, seen_inputs=seen)
    assert seen == [torch.Tensor]


class _ReplayedDenoise:
    """What a CUDA-graph replay does with its outputs: every call writes into the same static buffer."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def __call__(self, network: torch.nn.Module, *args) -> torch.Tensor:
        out = network.denoise(*args)
        if self.buffer is None:
            self.buffer = torch.empty_like(out)
        return self.buffer.copy_(out)


def test_cudagraph_view_copies_each_denoiser_output_out_of_the_replayed_buffer(monkeypatch):
    """DPM-Solver++ keeps the previous step's x0 (the raw output of an x0-predicting network); a replay that
    overwrites it silently turns the 2nd-order solver into something else. The cudagraph view must prevent that and
    start a new CUDA-graph step before every call."""
    torch.manual_seed(0)
    net = tiny_model().eval()
    image = torch.randn(1, 3, 16, 16)
    # unclipped, the solver keeps the network's own output tensor (clipping would make a new one)
    sampler = DiffusionSampler("dpmpp", steps=4, ensemble=2, seed=0, clip_sample=False)
    eager = sampler(net, image).members
    marks: list[int] = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    aliased = sampler(CompiledNetwork(net, denoise=_ReplayedDenoise(), cudagraphs=False), image).members
    assert not marks
    copied = sampler(CompiledNetwork(net, denoise=_ReplayedDenoise(), cudagraphs=True), image).members
    assert len(marks) == 4  # one graph step per sampler step
    assert torch.allclose(copied, eager, atol=1e-6)
    assert (aliased - eager).abs().max() > 1e-3  # what the copy is for


def test_compile_mode_is_checked_where_it_is_set():
    assert COMPILE_MODES[0] == "default" and "reduce-overhead" in COMPILE_MODES
    for build in (
        lambda mode: DiffusionSegInferer(compile=True, compile_mode=mode),
        lambda mode: DiffusionTrainIteration(make_scheduler("ddpm"), MedSegDiffLoss(2), compile_mode=mode),
        lambda mode: compile_network_calls("inductor", mode=mode),
    ):
        with pytest.raises(ValueError, match="reduce_overhead"):
            build("reduce_overhead")
    # graphs are only replayed by inductor's cudagraph modes; another backend ignores the mode
    assert compile_network_calls("inductor", mode="reduce-overhead")(tiny_model())._cudagraphs
    assert not compile_network_calls("inductor")(tiny_model())._cudagraphs
    assert not compile_network_calls("aot_eager", mode="reduce-overhead")(tiny_model())._cudagraphs
    # the backend that only replays graphs needs the same copy-out as inductor's graph modes, whatever the mode
    assert compile_network_calls("cudagraphs")(tiny_model())._cudagraphs
    assert replays_cudagraphs("cudagraphs", "default") and not replays_cudagraphs("inductor", "default")


def test_training_compiles_the_cuda_graph_modes_without_graphs():
    """train.json's one compile_mode also reaches the validation sampler, which keeps its graphs; the training step
    compiles the same fusion without them (a replayed training forward lost the activations its backward needed)."""
    assert [without_cudagraphs(m) for m in COMPILE_MODES] == [
        "default", "default", "max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs"]
    with pytest.raises(ValueError, match="compile_mode"):
        without_cudagraphs("fast")
    with pytest.warns(UserWarning, match="is compiled as 'default', without CUDA graphs"):
        iteration = DiffusionTrainIteration(make_scheduler("ddpm"), MedSegDiffLoss(2), compile=True,
                                            compile_mode="reduce-overhead")
    assert iteration.compile_mode == "default"
    assert not iteration._compiled(tiny_model())._cudagraphs
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say when nothing is compiled or the mode has no graphs
        DiffusionTrainIteration(make_scheduler("ddpm"), MedSegDiffLoss(2), compile_mode="reduce-overhead")
        DiffusionTrainIteration(make_scheduler("ddpm"), MedSegDiffLoss(2), compile=True, compile_mode="default")
    # the backend that only replays graphs leaves the training step eager
    with pytest.warns(UserWarning, match="the training step runs eagerly"):
        iteration = DiffusionTrainIteration(make_scheduler("ddpm"), MedSegDiffLoss(2), compile=True,
                                            compile_backend="cudagraphs")
    assert iteration._compiled is None
    # the sampler keeps them
    assert DiffusionSegInferer(compile=True, compile_mode="reduce-overhead").compile_mode == "reduce-overhead"


def _run_one_epoch(batches: list, prepare_batch=None) -> None:
    net = tiny_model()
    options = {} if prepare_batch is None else {"prepare_batch": prepare_batch}
    SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=batches, network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=MedSegDiffLoss(2),
        iteration_update=DiffusionTrainIteration(make_scheduler("ddpm"), MedSegDiffLoss(2)), amp=False,
        decollate=False, **options,
    ).run()


def test_training_checks_each_label_on_the_host_before_the_copy(monkeypatch):
    """On a GPU, a check of the copied label must read its result back and so waits for every queued kernel, once per
    iteration; the label is checked while it is still on the host instead, and not again on the device."""
    import medsegdiff_bundle.diffusion.labels as labels
    import medsegdiff_bundle.diffusion.losses as losses
    import medsegdiff_bundle.engine.iteration as iteration

    image, label = synthetic_batch(4, 32, seed=7)
    batches = [{"image": image[2 * i: 2 * i + 2], "label": label[2 * i: 2 * i + 2]} for i in range(2)]
    calls: dict[str, int] = {}
    check = labels.validate_label
    for module in (labels, losses, iteration):
        def counted(*args, _name=module.__name__, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return check(*args, **kwargs)

        monkeypatch.setattr(module, "validate_label", counted)
    _run_one_epoch(batches)
    assert calls == {iteration.__name__: 2}  # once per batch, on the host only
    calls.clear()
    # a custom prepare_batch may build the label itself: then the check stays where the label is used
    from monai.engines.utils import default_prepare_batch

    _run_one_epoch(batches, prepare_batch=lambda *args, **kwargs: default_prepare_batch(*args, **kwargs))
    assert calls == {labels.__name__: 2, losses.__name__: 2}


def test_a_wrong_label_in_a_training_batch_names_its_case():
    image, label = synthetic_batch(3, 16, seed=7)
    label[1, 0, 0, 0] = 2  # a binary task: class 2 does not exist
    files = ["case_a.nii.gz", "case_b.nii.gz", "case_c.nii.gz"]
    batch = {"image": MetaTensor(image), "label": MetaTensor(label, meta={"filename_or_obj": files})}
    with pytest.raises(ValueError, match=r"span \[0, 2\].*wrong label: \['case_b.nii.gz'\]"):
        _run_one_epoch([batch])


@pytest.mark.parametrize("avx512_bf16, amx, expected",
                         [(False, False, False), (True, False, True), (False, True, True)])
def test_bf16_is_fast_on_a_cpu_only_with_native_bf16(monkeypatch, avx512_bf16, amx, expected):
    """The configs' amp default: a CPU that only emulates bf16 (oneDNN converts around every operator) stays fp32."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert bf16_is_fast("cpu") is expected and bf16_is_fast(torch.device("cpu")) is expected


def test_bf16_is_fast_without_the_probes_or_on_other_devices(monkeypatch):
    # a torch build without the private probes falls back to fp32 rather than failing
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert bf16_is_fast("cpu") is False
    assert bf16_is_fast("meta") is False
    if not torch.cuda.is_available():
        assert bf16_is_fast("cuda") is False


def test_bf16_is_fast_on_cuda_excludes_emulated_bf16(monkeypatch):
    """A GPU without bf16 tensor cores (e.g. a V100 or T4) only emulates bf16: amp stays off there."""
    asked = []

    class _Device:  # torch.cuda.device(...) as a no-op context, so the check runs without a GPU
        def __init__(self, device):
            asked.append(str(device))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", _Device)
    for native in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native:
                            n or including_emulation)
        assert bf16_is_fast("cuda:1") is native
    assert asked == ["cuda:1", "cuda:1"]
