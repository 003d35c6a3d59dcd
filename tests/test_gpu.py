"""CUDA-only checks of the fast path; every test skips where ``torch.cuda.is_available()`` is false.

(a) the sampling loop makes no host-device synchronisation (``torch.cuda.set_sync_debug_mode("error")``);
(b) bf16 + channels-last sampling agrees with fp32; (c) a training iteration under bf16 autocast gives a finite loss;
(d) ``torch.compile`` (inductor, with and without CUDA graphs, and the ``cudagraphs`` backend) matches eager, in
sampling and in training; (e) the package's GroupNorm stays bf16 under autocast; (f) the loss curves, a
bundle-style training iteration and ``train.json``'s own training loop never synchronise. ``benchmarks/device/run.sh tests`` runs this file on a lent GPU.

Kept to imports the GPU machine has (no SimpleITK, nibabel or itk at import time) and to tiny models, so that the
whole file, inductor compilations included, takes a couple of minutes.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager

import pytest
import torch

from medsegdiff_bundle.diffusion import DiffusionSampler, MedSegDiffLoss, make_scheduler
from medsegdiff_bundle.engine import DiffusionSegInferer, DiffusionTrainIteration, to_channels_last
from medsegdiff_bundle.networks import MedSegDiffV2

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _device() -> torch.device:
    return torch.device("cuda")


def _untrained(channels=(8, 16, 32)) -> MedSegDiffV2:
    torch.manual_seed(0)
    return MedSegDiffV2(2, 3, 2, channels=channels).to(_device()).eval()


def _train(model: MedSegDiffV2, image: torch.Tensor, label: torch.Tensor, iterations: int) -> None:
    """Plain AdamW loop on the diffusion objective, all on the model's device (tests.helpers.train draws with a
    CPU generator, which CUDA sampling refuses)."""
    from medsegdiff_bundle.diffusion import diffusion_forward

    device = image.device
    scheduler, loss_fn = make_scheduler("ddpm"), MedSegDiffLoss(model.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    pick = torch.Generator(device=device).manual_seed(0)
    noise = torch.Generator(device=device).manual_seed(1)
    model.train()
    for _ in range(iterations):
        idx = torch.randint(0, image.shape[0], (8,), generator=pick, device=device)
        loss = diffusion_forward(model, scheduler, loss_fn, image[idx], label[idx], noise)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def trained():
    """A small model trained for a few seconds on synthetic discs, so that masks are confident and comparable
    (the same recipe reaches Dice > 0.7 on CPU in tests/test_training.py). Returns (model, images, labels)."""
    from tests.helpers import dice, synthetic_batch

    torch.manual_seed(0)
    image, label = synthetic_batch(32, 32, seed=100)
    model = MedSegDiffV2(2, 3, 2, channels=(16, 32, 64)).to(_device())
    _train(model, image.to(_device()), label.to(_device()), iterations=700)
    test_image, test_label = synthetic_batch(4, 32, seed=200)
    test_image, test_label = test_image.to(_device()), test_label.to(_device())
    probs = DiffusionSegInferer("dpmpp", steps=10, ensemble=3, seed=0)(test_image, model)
    assert dice(probs, test_label) > 0.7, "the model did not learn; the comparisons below would mean little"
    return model, test_image, test_label


@contextmanager
def _sync_is_an_error():
    """Raise on any synchronising CUDA call (``.item()``, D2H/H2D copies of pageable memory, stream syncs...)."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(1) == b.argmax(1)).float().mean())


# ------------------------------------------------------------------------------------------- (a) no host syncs
@pytest.mark.parametrize("sampler, steps, num_train_timesteps", [("dpmpp", 10, 1000), ("ddim", 10, 1000),
                                                                  ("ddpm", 20, 20)])
def test_sampling_loop_never_synchronises_host_and_device(sampler, steps, num_train_timesteps):
    net = _untrained()
    image = torch.randn(2, 3, 32, 32, device=_device())
    sample = DiffusionSampler(sampler, steps, ensemble=3, num_train_timesteps=num_train_timesteps, seed=0)
    sample(net, image)  # warm-up: cuDNN/cuBLAS handles, kernel selection, allocator
    torch.cuda.synchronize()
    with _sync_is_an_error():
        result = sample(net, image)
    torch.cuda.synchronize()
    assert torch.isfinite(result.probs).all() and result.probs.shape == (2, 2, 32, 32)


# the options the bundle's validation and the accuracy switches add (anchor blend, anchor channels, rounding)
OPTIONS = {"anchor_weight": 0.5, "return_anchor": True, "return_uncertainty": True, "round_x0": True}


@pytest.mark.parametrize("sampler, options", [("dpmpp", {}), ("ddim", {}), ("dpmpp", OPTIONS)])
def test_fast_inferer_call_never_synchronises_host_and_device(sampler, options):
    """The whole DiffusionSegInferer call as the bundle makes it on a GPU: bf16 autocast and channels-last."""
    net = _untrained()
    image = torch.randn(1, 3, 32, 32, device=_device())
    inferer = DiffusionSegInferer(sampler, steps=10, ensemble=5, amp=True, channels_last=True, **options)
    inferer(image, net)  # warm-up (also converts the network to channels-last, once)
    torch.cuda.synchronize()
    with _sync_is_an_error():
        probs = inferer(image, net)
    torch.cuda.synchronize()
    assert torch.isfinite(probs).all()


# ------------------------------------------------------------------------------- (b) bf16 + channels-last vs fp32
def test_bf16_channels_last_sampling_agrees_with_fp32(trained):
    model, image, _ = trained
    reference = DiffusionSegInferer("dpmpp", steps=10, ensemble=3, seed=0)(image, model)
    fast_model = copy.deepcopy(model)
    fast = DiffusionSegInferer("dpmpp", steps=10, ensemble=3, seed=0, amp=True, channels_last=True)(image, fast_model)
    kernels = [p for p in fast_model.diffusion_unet.parameters() if p.ndim == 4 and min(p.shape[1:]) > 1]
    assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
    assert fast.dtype == torch.float32 and fast.stride() == reference.stride()
    assert float((fast - reference).abs().mean()) < 0.02
    assert _agreement(fast, reference) > 0.98


# --------------------------------------------------------------------------------- (c) a training step under amp
@pytest.mark.parametrize("channels_last", [False, True])
def test_training_iteration_with_amp_gives_a_finite_loss(channels_last):
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer

    from tests.helpers import synthetic_batch

    net = MedSegDiffV2(2, 3, 2, channels=(8, 16, 32)).to(_device())
    to_channels_last(net, channels_last)
    before = [p.detach().clone() for p in net.parameters()]
    image, label = synthetic_batch(4, 32, seed=1)
    batches = [{"image": image[:2], "label": label[:2]}, {"image": image[2:], "label": label[2:]}]
    dtypes = []
    net.condition_unet.stem.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    losses = []
    trainer = SupervisedTrainer(
        device=_device(), max_epochs=1, train_data_loader=batches, network=net,
        optimizer=torch.optim.AdamW(net.parameters(), lr=1e-3), loss_function=MedSegDiffLoss(2),
        iteration_update=DiffusionTrainIteration(make_scheduler("ddpm"), MedSegDiffLoss(2),
                                                 channels_last=channels_last),
        amp=True, decollate=False,
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    trainer.run()
    assert dtypes and all(d == torch.bfloat16 for d in dtypes)  # autocast was on
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(net.parameters(), before))  # the optimiser stepped


# ---------------------------------------------------------------------------------- (d) torch.compile vs eager
@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("backend, mode", [("inductor", "default"), ("inductor", "reduce-overhead"),
                                           ("cudagraphs", "default")])
def test_compiled_denoiser_matches_eager_and_compiles_once(backend, mode):
    """Inductor, with and without CUDA-graph replay, and graphs without inductor: the same probabilities, one graph
    for all steps and calls (a replayed output read after the next replay would raise here; test_fastpath checks the
    copy that prevents it)."""
    from torch._dynamo.utils import counters

    net = _untrained()
    image = torch.randn(2, 3, 32, 32, device=_device())
    options = {"steps": 5, "ensemble": 2, "seed": 0}
    eager = DiffusionSegInferer("dpmpp", **options)(image, net)
    counters.clear()
    inferer = DiffusionSegInferer("dpmpp", **options, compile=True, compile_backend=backend, compile_mode=mode)
    first = inferer(image, net)
    second = inferer(image, net)
    assert counters["stats"]["unique_graphs"] == 1  # compiled on the first call, reused by every later step/call
    assert torch.allclose(first, eager, atol=1e-3)
    assert torch.allclose(second, first, atol=1e-6)
    assert "_orig_mod" not in "".join(net.state_dict())


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_bf16_channels_last_fast_path_agrees_with_eager(trained):
    """All switches on (what inference.json --amp true --channels_last true --compile true runs)."""
    model, image, _ = trained
    eager_model, compiled_model = copy.deepcopy(model), copy.deepcopy(model)
    options = {"steps": 10, "ensemble": 3, "seed": 0, "amp": True, "channels_last": True}
    eager = DiffusionSegInferer("dpmpp", **options)(image, eager_model)
    compiled = DiffusionSegInferer("dpmpp", **options, compile=True)(image, compiled_model)
    assert float((compiled - eager).abs().mean()) < 0.02
    assert _agreement(compiled, eager) > 0.98


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_training_follows_the_eager_losses_and_weights():
    """compile_mode="reduce-overhead" (train.json's one key, which also serves the validation sampler) compiles the
    training step with inductor but without CUDA graphs: replayed, its backward read activations that a later replay
    had overwritten (H200, torch 2.11). Compiled, it gives the eager run's losses and updated weights over several
    iterations (fp32, so only inductor's rounding differs)."""
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer

    from tests.helpers import synthetic_batch

    image, label = synthetic_batch(8, 32, seed=7)
    batches = [{"image": image[2 * i: 2 * i + 2], "label": label[2 * i: 2 * i + 2]} for i in range(4)]

    def run(**options) -> tuple[torch.nn.Module, list[float]]:
        torch.manual_seed(0)
        net = MedSegDiffV2(2, 3, 2, channels=(8, 16, 32)).to(_device())
        iteration = DiffusionTrainIteration(make_scheduler("ddpm"), MedSegDiffLoss(2), seed=3, **options)
        trainer = SupervisedTrainer(
            device=_device(), max_epochs=1, train_data_loader=batches, network=net,
            optimizer=torch.optim.SGD(net.parameters(), lr=0.05), loss_function=MedSegDiffLoss(2),
            iteration_update=iteration, amp=False, decollate=False,
        )
        losses: list[float] = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
        trainer.run()
        return net, losses

    eager, eager_losses = run()
    with pytest.warns(UserWarning, match="without CUDA graphs"):
        compiled, compiled_losses = run(compile=True, compile_mode="reduce-overhead")
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-3, abs=1e-4)
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        assert torch.allclose(a, b, atol=1e-4), name


# ------------------------------------------------------------------- (e) GroupNorm in bf16 under CUDA autocast
def _saved_bytes_of_a_training_forward(net: torch.nn.Module) -> int:
    """Bytes autograd keeps for backward in one bf16-autocast training forward at 64^2, batch 2, on the GPU."""
    from medsegdiff_bundle.planning.memory import measure_saved_activations

    return measure_saved_activations(2, 3, 2, net.diffusion_unet.channels, 1, [64, 64], 2, amp=True, network=net)


# (backbone of the condition UNet, most bytes kept relative to the same network with torch's GroupNorm). The plain
# condition UNet (the default since 0.4.0) uses instance norm, which CUDA autocast runs in bf16 either way, so only
# the diffusion UNet's share changes: 0.801 on an H100 (2026-11-26), where the all-GroupNorm residual one kept < 0.8
@pytest.mark.parametrize("backbone, most", [("plain", 0.9), ("residual", 0.8)])
def test_group_norm_stays_bf16_under_cuda_autocast_and_backward_keeps_less(backbone, most):
    """CUDA autocast would run nn.GroupNorm in fp32 (casts both ways, fp32 copies kept for backward); ours keeps
    bf16 with the same statistics, and a training forward of the network keeps clearly fewer bytes."""
    from medsegdiff_bundle.networks.blocks import GroupNorm

    torch.manual_seed(0)
    ours = GroupNorm(8, 32).to(_device())
    torch.nn.init.normal_(ours.weight)
    torch.nn.init.normal_(ours.bias)
    plain = torch.nn.GroupNorm(8, 32).to(_device())
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(4, 32, 64, 64, device=_device()) * 3 + 1
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert plain(x.bfloat16()).dtype == torch.float32  # what autocast does with nn.GroupNorm
        out = ours(x.bfloat16())
    assert out.dtype == torch.bfloat16
    reference = plain(x)  # fp32 throughout
    assert float((out.float() - reference).norm() / reference.norm()) < 1e-2

    net = MedSegDiffV2(2, 3, 2, channels=(16, 32, 64), condition_backbone=backbone).to(_device())
    kept = _saved_bytes_of_a_training_forward(net)
    for module in net.modules():
        if isinstance(module, GroupNorm):
            module.__class__ = torch.nn.GroupNorm  # the plain module, same parameters
    kept_fp32_norms = _saved_bytes_of_a_training_forward(net)
    assert kept < most * kept_fp32_norms, (kept, kept_fp32_norms)


# ------------------------------------------------------------------- (f) the training loop's loss bookkeeping
def test_training_curves_handler_never_synchronises_per_iteration(tmp_path):
    """Recording an iteration's CUDA losses must not wait for the GPU; the epoch's write reads them all at once."""
    from types import SimpleNamespace

    import pandas as pd

    from medsegdiff_bundle.engine import TrainingCurvesHandler

    handler = TrainingCurvesHandler(tmp_path)
    engine = SimpleNamespace(state=SimpleNamespace(iteration=0, epoch=1, output=None))
    values = torch.rand(5, device=_device())
    with _sync_is_an_error():
        for it in range(5):
            engine.state.iteration = it + 1
            engine.state.output = {"loss": values[it] * 2, "anchor_loss": values[it]}
            handler.iteration_completed(engine)
    handler.write()
    log = pd.read_csv(tmp_path / "training_log.csv")
    assert log["loss"].tolist() == pytest.approx((values * 2).tolist())
    assert log["anchor_loss"].tolist() == pytest.approx(values.tolist())


def _run_with_a_sync_free_iteration(trainer, run, iteration: int = 3) -> None:
    """``run()`` with any synchronising CUDA call during ``iteration`` (warm by then) an error. Registered last, the
    window closes after the other handlers of that iteration have run."""
    from ignite.engine import Events

    trainer.add_event_handler(Events.ITERATION_STARTED(once=iteration),
                              lambda e: torch.cuda.set_sync_debug_mode("error"))
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=iteration), lambda e: torch.cuda.set_sync_debug_mode(0))
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_a_bundle_style_training_iteration_never_synchronises(tmp_path):
    """What train.json sets up on CUDA (pinned batches, non_blocking copies, bf16, the EMA and loss-curve handlers):
    once warm (iteration 3), an iteration never waits for the GPU, so the host queues the next step's kernels while
    the GPU runs this one."""
    from monai.engines import SupervisedTrainer

    from medsegdiff_bundle.engine import EMAModel, EMAUpdateHandler, TrainingCurvesHandler
    from tests.helpers import synthetic_batch

    torch.manual_seed(0)
    net = MedSegDiffV2(2, 3, 2, channels=(8, 16, 32)).to(_device())
    image, label = synthetic_batch(8, 32, seed=7)
    batches = [{"image": image[2 * i: 2 * i + 2].pin_memory(), "label": label[2 * i: 2 * i + 2].pin_memory()}
               for i in range(4)]
    trainer = SupervisedTrainer(
        device=_device(), max_epochs=1, train_data_loader=batches, network=net,
        optimizer=torch.optim.AdamW(net.parameters(), lr=1e-3), loss_function=MedSegDiffLoss(2),
        iteration_update=DiffusionTrainIteration(make_scheduler("ddpm"), MedSegDiffLoss(2)),
        amp=True, non_blocking=True, decollate=False,
    )
    EMAUpdateHandler(EMAModel(net), net).attach(trainer)
    curves = TrainingCurvesHandler(tmp_path)
    curves.attach(trainer)
    _run_with_a_sync_free_iteration(trainer, trainer.run)
    assert trainer.state.iteration == 4 and len(curves.rows) == 4
    assert all(math.isfinite(row["loss"]) for row in curves.rows)


@pytest.mark.parametrize("condition_warmup", [0.0, 0.99], ids=["joint", "condition-warm-up"])
def test_the_bundle_training_loop_never_synchronises_once_warm(tmp_path, condition_warmup):
    """``train.json`` itself on CUDA: the real loader's pinned MetaTensor batches, bf16, the EMA, loss-curve, loop
    timing and per-iteration learning-rate handlers, and the trainer's own handling of the iteration's output. A
    warm iteration (the third) never waits for the GPU. The test above builds its trainer by hand with
    ``decollate=False``; the bundle's trainer decollated by default, reading every loss back at every step, and its
    loop trained at half the bare step's images per second on an H100. With ``condition_warmup`` 0.99 all four
    iterations are warm-up steps (the condition UNet alone), which must not wait either."""
    from medsegdiff_bundle.data import write_synthetic_dataset
    from tests.bundle_utils import workflow

    write_synthetic_dataset(tmp_path / "data", 8, (32, 32), seed=3)
    wf = workflow("train", "train", tmp_path, amp=True, patch_size=[32, 32], batch_size=2, max_epochs=1,
                  iterations_per_epoch=4, val_interval=100, log_interval=100, condition_warmup=condition_warmup)
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.device.type == "cuda"
    _run_with_a_sync_free_iteration(trainer, wf.run)
    assert trainer.state.iteration == 4
    assert wf.parser.get_parsed_content("condition_warmup_schedule").active(4) == (condition_warmup > 0)
