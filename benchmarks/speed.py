#!/usr/bin/env python
"""Speed benchmark of MedSegDiff-V2: training throughput, fast sampling latency, and the original compute pattern.

One configuration, one run, one device. Three phases (see ``benchmarks/README.md`` for what each number means):

* ``train``: steady-state throughput of a full training step (``diffusion_forward`` + backward + AdamW step) at
  ``--size`` with each ``--train-batch`` (warm-up iterations excluded) and its peak memory; the reported batch is
  the fastest within ``--train-mem-limit-gb``.
* ``fast``: latency per image of the package's inference path, ``DiffusionSegInferer`` (= ``DiffusionSampler``
  ``"dpmpp"``, ``--steps`` steps, ``--ensemble`` members denoised as one batch, condition network run once),
  optionally with bf16 autocast (``--amp``), channels-last (``--channels-last``) and a ``torch.compile``-d
  denoiser (``--compile``, ``--compile-mode``; the training forward is compiled too).
* ``reference``: the original MedSegDiff compute pattern: ``--reference-steps`` DDPM steps, ensemble members one
  after another (batch 1 each), ``network(x_t, image, t)`` (= condition + denoise) at every step, fp32, eager.
  Unless ``--reference-full`` is given, only ``--reference-steps-measured`` steps of one member are timed and the
  latency is extrapolated to ``reference_steps x ensemble`` steps (recorded as ``reference_extrapolated``).

The JSON is written after every phase (``"complete": false`` until the last), so a run stopped by a time limit
keeps what it measured; ``--profile`` runs last.

Example::

    python benchmarks/speed.py --preset default --device cuda --amp --reference-full
    python benchmarks/speed.py --preset small --device cpu --out benchmarks/results/speed_cpu_2025-01-01.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, str(_ROOT))

import monai  # noqa: E402

from medsegdiff_bundle.diffusion import MedSegDiffLoss, diffusion_forward, make_scheduler, validate_label  # noqa: E402
from medsegdiff_bundle.engine.fastpath import (  # noqa: E402
    COMPILE_MODES,
    compile_training_calls,
    to_channels_last,
    without_cudagraphs,
)
from medsegdiff_bundle.engine.inferer import DiffusionSegInferer  # noqa: E402
from medsegdiff_bundle.networks import CONDITION_BACKBONES, MedSegDiffV2  # noqa: E402
from medsegdiff_bundle.networks.blocks import GroupNorm  # noqa: E402
from medsegdiff_bundle.utils import unused_path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from op_profile import profile_ops  # noqa: E402

# name -> MedSegDiffV2 keyword arguments
PRESETS: dict[str, dict] = {
    # CPU-friendly: ~2.9 M parameters (2D, 3 input channels, binary; 3.7 M with bundle 0.3's residual condition UNet)
    "small": {"channels": (16, 32, 64, 128), "num_res_blocks": 1},
    # the package default MedSegDiffV2: ~11.1 M parameters (14.5 M with the residual condition UNet)
    "default": {"channels": (32, 64, 128, 256), "num_res_blocks": 1},
    # for comparability with the paper's model size (MedSegDiff-V2 reports ~129 M parameters): two residual
    # blocks per level, widths 128/256/512/512, residual condition UNet -> ~130 M parameters (2D, 3 input channels,
    # binary). Not the paper's exact architecture (which was not released), the same order of compute.
    "paper": {"channels": (128, 256, 512, 512), "num_res_blocks": 2, "condition_backbone": "residual"},
}

# defaults that depend on --spatial-dims: 2D = 256^2, ensemble 5; 3D = 96^3 patch, ensemble 3
DIM_DEFAULTS = {
    2: {"size": 256, "ensemble": 5, "train_batch": 8, "in_channels": 3},
    3: {"size": 96, "ensemble": 3, "train_batch": 2, "in_channels": 4},
}


# ----------------------------------------------------------------------------------------------------- helpers
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "device"


def default_out(device: torch.device, date: str) -> Path:
    if device.type == "cuda":
        name = slug(torch.cuda.get_device_name(device))
    else:
        name = f"cpu-{os.cpu_count()}c"
    # a second run on the same day must not replace the committed results of the first
    return unused_path(_ROOT / "benchmarks" / "results" / f"speed_{name}_{date}.json")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024


class MemoryMeter:
    """GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
    CPU: growth of the process's peak RSS (``ru_maxrss``) during the phase: best effort only, since the peak is
    process-wide and never reset (a phase that stays below an earlier peak reports ~0)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = (
            "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_peak_rss_growth_best_effort (ru_maxrss)"
        )

    def __enter__(self) -> MemoryMeter:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        self._start = max_rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak_bytes = max(0, max_rss_bytes() - self._start)

    @property
    def gb(self) -> float:
        return self.peak_bytes / 1024**3


class CallCounter:
    """Count calls of ``network.condition`` / ``network.denoise`` (instance attributes shadow the methods; the
    sampler and ``MedSegDiffV2.forward`` both look them up on the instance)."""

    def __init__(self, network: MedSegDiffV2) -> None:
        self.network = network
        self.counts = {"condition": 0, "denoise": 0}
        self._wrap("condition")
        self._wrap("denoise")

    def _wrap(self, name: str) -> None:
        inner = getattr(self.network, name)  # bound method, or a compiled instance attribute
        counts = self.counts

        def wrapped(*args, **kwargs):
            counts[name] += 1
            return inner(*args, **kwargs)

        setattr(self.network, name, wrapped)

    def reset(self) -> None:
        self.counts["condition"] = self.counts["denoise"] = 0

    def remove(self) -> None:
        for name in ("condition", "denoise"):
            self.network.__dict__.pop(name, None)


class CountingView:
    """Count the sampler's ``condition`` / ``denoise`` calls on whatever the inferer hands it (the network, or its
    compiled view): counting at that level counts every call, also those that run compiled code."""

    def __init__(self, target) -> None:
        self.target = target
        self.counts = {"condition": 0, "denoise": 0}

    def condition(self, *args, **kwargs):
        self.counts["condition"] += 1
        return self.target.condition(*args, **kwargs)

    def denoise(self, *args, **kwargs):
        self.counts["denoise"] += 1
        return self.target.denoise(*args, **kwargs)

    def __getattr__(self, name: str):
        if name == "target":
            raise AttributeError(name)
        return getattr(self.target, name)


class CountingInferer(DiffusionSegInferer):
    """The package's inferer, counting the sampler's calls on the network (or compiled view) it prepares."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.views: list[CountingView] = []

    def _prepare(self, net):
        self.views.append(CountingView(super()._prepare(net)))
        return self.views[-1]


def make_batch(args, network: MedSegDiffV2, batch: int, device: torch.device, generator: torch.Generator):
    """A synthetic image batch and an integer label map (a sphere/disc per sample, so every class occurs)."""
    shape = (args.size,) * args.spatial_dims
    image = torch.randn((batch, network.in_channels, *shape), generator=generator).to(device)
    grids = torch.meshgrid(*(torch.linspace(-1, 1, s) for s in shape), indexing="ij")
    radius = torch.sqrt(sum(g**2 for g in grids))
    label = torch.zeros((batch, 1, *shape), dtype=torch.long)
    for k in range(1, network.num_classes):  # nested shells: class k inside radius 1 - k / num_classes
        label[:, 0][:, radius < 1 - k / network.num_classes] = k
    return image, label.to(device)


def memory_format(args) -> torch.memory_format:
    if not args.channels_last:
        return torch.contiguous_format
    return torch.channels_last if args.spatial_dims == 2 else torch.channels_last_3d


def set_layout(args, network: MedSegDiffV2) -> torch.memory_format:
    """Lay ``network`` out as the bundle does (``to_channels_last`` with ``--channels-last``, which keeps the plain
    condition UNet contiguous; else all contiguous) and return the layout its inputs take."""
    if args.channels_last:
        to_channels_last(network, spatial_dims=args.spatial_dims)
    else:
        network.to(memory_format=torch.contiguous_format)
    return memory_format(args)


def training_step(
    network: MedSegDiffV2, image: torch.Tensor, label: torch.Tensor, amp: bool, seed: int = 0,
    num_train_timesteps: int = 1000, model=None, condition_only: bool = False,
) -> tuple[Callable[[], torch.Tensor], torch.optim.Optimizer]:
    """The bundle's training step on one fixed batch, ``image (B, C, *S)`` and a checked ``label (B, 1, *S)``:
    ``diffusion_forward`` (DDPM timesteps, ``MedSegDiffLoss``) under bf16 autocast with ``amp``, backward, AdamW.
    ``model`` (default ``network``) is what the forward calls, e.g. a compiled view. ``condition_only``: the step of
    a condition warm-up instead (the condition UNet alone on ``MedSegDiffLoss.condition_loss``, as
    ``DiffusionTrainIteration`` runs it). Returns ``step() -> loss`` and the optimizer (``step`` holds it too)."""
    scheduler = make_scheduler("ddpm", num_train_timesteps)
    loss_fn = MedSegDiffLoss(network.num_classes)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    generator = torch.Generator(device=image.device).manual_seed(seed)
    model = network if model is None else model

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=image.device.type, dtype=torch.bfloat16, enabled=amp):
            if condition_only:
                loss = loss_fn.condition_loss(network.condition(image).logits, label, check_label=False)["loss"]
            else:
                loss = diffusion_forward(model, scheduler, loss_fn, image, label, generator=generator,
                                         check_label=False)["loss"]
        loss.backward()
        optimizer.step()
        return loss

    return step, optimizer


# ------------------------------------------------------------------------------------------------------ phases
def bench_train(args, network: MedSegDiffV2, device: torch.device, batch: int) -> dict:
    """Full training step at ``batch``: diffusion_forward + backward + AdamW step, timed after warm-up. With
    ``--compile`` the forward (and so its backward) runs through the training iteration's compiled call
    (``compile_training_calls``, ``--compile-mode`` / ``--compile-backend`` without CUDA graphs, as the iteration);
    the warm-up iterations include compiling. The label is checked once, before the loop, as the bundle's iteration
    checks each batch on the host: a check on the GPU would make every step wait for the previous one."""
    fmt = set_layout(args, network)
    network.train()
    gen = torch.Generator().manual_seed(args.seed)
    image, label = make_batch(args, network, batch, device, gen)
    image = image.contiguous(memory_format=fmt)
    validate_label(label, network.num_classes)
    # the training iteration's compiled call (no CUDA graphs in training)
    view = compile_training_calls(args.compile_backend, args.compile_mode) if args.compile else None
    step, optimizer = training_step(network, image, label, args.amp, args.seed, args.reference_steps,
                                    model=None if view is None else view(network))

    with MemoryMeter(device) as mem:
        warm_start = time.perf_counter()
        for _ in range(args.train_warmup):
            step()
        sync(device)
        warmup_s = time.perf_counter() - warm_start
        start = time.perf_counter()
        for _ in range(args.train_iters):
            loss = step()
        sync(device)
        elapsed = time.perf_counter() - start
    last_loss = float(loss.detach())
    optimizer.zero_grad(set_to_none=True)
    del optimizer
    images = batch * args.train_iters
    voxels_per_image = args.size**args.spatial_dims
    return {
        "warmup_iters": args.train_warmup,
        "warmup_s": warmup_s,
        "timed_iters": args.train_iters,
        "batch": batch,
        "compiled": args.compile,
        "compile_mode": without_cudagraphs(args.compile_mode) if view is not None else None,
        "elapsed_s": elapsed,
        "s_per_iter": elapsed / args.train_iters,
        "img_per_s": images / elapsed,
        "voxels_per_s": images * voxels_per_image / elapsed,
        "peak_mem_gb": mem.gb,
        "peak_mem_kind": mem.kind,
        "last_loss": last_loss,
        "loss_finite": math.isfinite(last_loss),
    }


def mirror_axes(args) -> list[int]:
    """The fast path's test-time mirroring axes: every spatial axis with ``--mirror``, none without."""
    return list(range(args.spatial_dims)) if args.mirror else []


def bench_fast(args, network: MedSegDiffV2, device: torch.device) -> tuple[dict, Callable[[], torch.Tensor]]:
    """The package's inference path: DiffusionSegInferer(dpmpp, steps, ensemble), condition once, ensemble batch.
    Returns the timings and a function making one more call of the same (warm, compiled) inferer, for profiling."""
    fmt = set_layout(args, network)
    network.eval()
    # channels_last and compile are the inferer's own switches, as in the bundle (the network and image are
    # converted above, so channels_last only hands the output back in the default layout). The warm-up calls are
    # full calls of the same inferer: kernels, compilation and CUDA-graph recording are then behind us
    options = {"ensemble": args.ensemble, "seed": args.seed, "amp": args.amp, "channels_last": args.channels_last,
               "compile": args.compile, "compile_backend": args.compile_backend, "compile_mode": args.compile_mode,
               "mirror_axes": mirror_axes(args)}
    inferer = CountingInferer("dpmpp", steps=args.steps, **options)
    gen = torch.Generator().manual_seed(args.seed + 1)
    image, _ = make_batch(args, network, args.sample_batch, device, gen)
    image = image.contiguous(memory_format=fmt)
    with torch.no_grad():
        warm_start = time.perf_counter()
        for _ in range(args.sample_warmup):
            inferer(image, network)
        sync(device)
        warmup_s = time.perf_counter() - warm_start
        inferer.views.clear()
        times = []
        with MemoryMeter(device) as mem:
            for _ in range(args.repeats):
                sync(device)
                start = time.perf_counter()
                out = inferer(image, network)
                sync(device)
                times.append(time.perf_counter() - start)
        counts = {k: sum(v.counts[k] for v in inferer.views) for k in ("condition", "denoise")}  # of the timed calls only
    finite = bool(torch.isfinite(out).all())
    calls = args.repeats
    latency = statistics.median(times) / args.sample_batch
    return {
        "sampler": "dpmpp",
        "steps": args.steps,
        "ensemble": args.ensemble,
        "image_batch": args.sample_batch,
        "amp_bf16": args.amp,
        "channels_last": args.channels_last,
        "compiled_denoiser": args.compile,
        "compile_mode": args.compile_mode if args.compile else None,
        "mirror_axes": mirror_axes(args),
        "warmup_calls": args.sample_warmup,
        "warmup_s": warmup_s,
        "repeats": args.repeats,
        "call_times_s": times,
        "latency_per_image_s": latency,
        "sampling_calls": calls,
        "condition_calls": counts["condition"],
        "denoise_calls": counts["denoise"],
        "condition_calls_per_call": counts["condition"] / calls,
        "denoise_calls_per_call": counts["denoise"] / calls,
        "peak_mem_gb": mem.gb,
        "peak_mem_kind": mem.kind,
        "output_finite": finite,
    }, lambda: inferer(image, network)


def bench_reference(args, network: MedSegDiffV2, device: torch.device) -> dict:
    """Original MedSegDiff pattern: DDPM over all steps, members one after another at batch 1, condition recomputed
    at every step (``network(x_t, image, t)``), fp32, eager, contiguous memory."""
    network.to(memory_format=torch.contiguous_format).eval()
    counter = CallCounter(network)
    total_steps = args.reference_steps
    full = args.reference_full or args.reference_steps_measured >= total_steps
    measured_steps = total_steps if full else args.reference_steps_measured
    measured_members = args.ensemble if full else 1
    scheduler = make_scheduler("ddpm", total_steps, prediction_type="epsilon")  # the original predicts the noise
    scheduler.set_timesteps(total_steps)
    timesteps = scheduler.timesteps.tolist()
    gen = torch.Generator().manual_seed(args.seed + 1)
    image, _ = make_batch(args, network, 1, device, gen)
    noise_gen = torch.Generator(device=device).manual_seed(args.seed)
    shape = (1, network.mask_channels, *image.shape[2:])

    def run_member(steps: list[int]) -> torch.Tensor:
        x = torch.randn(shape, generator=noise_gen, device=device)
        for t in steps:
            eps, _ = network(x, image, torch.full((1,), t, device=device, dtype=torch.long))
            x, _ = scheduler.step(eps, t, x, generator=noise_gen)
        return x

    try:
        with torch.no_grad():
            run_member(timesteps[: args.reference_warmup_steps])  # warm-up, excluded
            sync(device)
            counter.reset()
            with MemoryMeter(device) as mem:
                start = time.perf_counter()
                for _ in range(measured_members):
                    x = run_member(timesteps[:measured_steps])
                sync(device)
                elapsed = time.perf_counter() - start
        finite = bool(torch.isfinite(x).all())
    finally:
        counter.remove()
    per_step = elapsed / (measured_steps * measured_members)
    latency = per_step * total_steps * args.ensemble
    return {
        "sampler": "ddpm",
        "prediction_type": "epsilon",
        "precision": "fp32",
        "reference_steps": total_steps,
        "ensemble": args.ensemble,
        "members_batch": 1,
        "extrapolated": not full,
        "warmup_steps": args.reference_warmup_steps,
        "measured_steps": measured_steps,
        "measured_members": measured_members,
        "measured_s": elapsed,
        "per_step_s": per_step,
        "latency_per_image_s": latency,
        "latency_formula": "per_step_s * reference_steps * ensemble" if not full else "measured",
        "condition_calls": counter.counts["condition"],
        "denoise_calls": counter.counts["denoise"],
        "condition_calls_full_run": total_steps * args.ensemble,
        "peak_mem_gb": mem.gb,
        "peak_mem_kind": mem.kind,
        "output_finite": finite,
    }


def pick_train_run(runs: list[dict], mem_limit_gb: float) -> dict:
    """The fastest run whose peak memory is within ``mem_limit_gb`` (else the least memory-hungry one), marked with
    ``within_mem_limit``; the rule the issue's target states (throughput at <= 12 GB)."""
    within = [r for r in runs if r["peak_mem_gb"] <= mem_limit_gb]
    best = max(within, key=lambda r: r["img_per_s"]) if within else min(runs, key=lambda r: r["peak_mem_gb"])
    return {**best, "within_mem_limit": bool(within), "mem_limit_gb": mem_limit_gb}


# ---------------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output (default benchmarks/results/speed_<device>_<date>.json, or _2, _3, ... if taken)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default", help="model size (see PRESETS)")
    p.add_argument("--condition-channels", type=int, nargs="+", default=None,
                   help="condition-UNet widths, as many levels as the preset's (default: the preset's widths)")
    p.add_argument("--condition-backbone", choices=CONDITION_BACKBONES, default=None,
                   help="condition UNet (default: the preset's; the package default is plain)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--spatial-dims", type=int, choices=(2, 3), default=2)
    p.add_argument("--size", type=int, default=None, help="spatial size per axis (default 256 in 2D, 96 in 3D)")
    p.add_argument("--in-channels", type=int, default=None, help="image channels (default 3 in 2D, 4 in 3D)")
    p.add_argument("--num-classes", type=int, default=2, help="classes including background (2 = binary)")
    p.add_argument("--ensemble", type=int, default=None, help="members per image (default 5 in 2D, 3 in 3D)")
    p.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps of the fast path")
    p.add_argument("--sample-batch", type=int, default=1, help="images per sampling call (latency is per image)")
    p.add_argument("--repeats", type=int, default=3, help="timed sampling calls (the median is reported)")
    p.add_argument("--sample-warmup", type=int, default=None,
                   help="untimed sampling calls before timing (default 1; 3 with --compile: compiling, then recording "
                        "CUDA graphs in the reduce-overhead mode)")
    p.add_argument("--reference-steps", type=int, default=1000, help="DDPM steps of the reference mode (T)")
    p.add_argument("--reference-steps-measured", type=int, default=10,
                   help="steps of one member timed in the reference mode before extrapolating")
    p.add_argument("--reference-warmup-steps", type=int, default=1, help="untimed reference steps before timing")
    p.add_argument("--reference-full", action="store_true",
                   help="run the reference mode completely (reference_steps x ensemble steps; meant for GPUs)")
    p.add_argument("--train-batch", type=int, nargs="+", default=None,
                   help="training batch, or several to measure each (default 8 in 2D, 2 in 3D); the result's "
                        "train_img_per_s is the fastest of them whose peak memory is within --train-mem-limit-gb")
    p.add_argument("--train-mem-limit-gb", type=float, default=12.0,
                   help="peak-memory limit of the reported training batch (the issue's target: 12 GB)")
    p.add_argument("--train-iters", type=int, default=20, help="timed training iterations")
    p.add_argument("--train-warmup", type=int, default=3, help="untimed training iterations before timing")
    p.add_argument("--skip-train", action="store_true", help="skip the training phase")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the fast path's denoiser (the inferer's compile switch) and the training forward "
                        "(the training iteration's)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="inductor mode; reduce-overhead replays the sampler's calls as CUDA graphs (training is "
                        "compiled without graphs, as the training iteration does)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: CPU smoke tests)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format (train and fast path)")
    p.add_argument("--mirror", action="store_true",
                   help="test-time mirroring along every spatial axis in the fast path (DiffusionSegInferer "
                        "mirror_axes: the condition network runs on every mirrored view)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (train and fast path; FFTs stay fp32)")
    p.add_argument("--fp32-norm", action="store_true",
                   help="plain nn.GroupNorm instead of the package's (CUDA autocast then runs it in fp32, as before "
                        "0.3.0): the comparison behind medsegdiff_bundle.networks.blocks.GroupNorm")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile N fast-path calls (torch.profiler): time by operator kind and the top operators")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.sample_warmup is None:  # compiled kernels keep settling for a call or two after the first compilation
        args.sample_warmup = 3 if args.compile else 1
    for key, value in DIM_DEFAULTS[args.spatial_dims].items():
        if getattr(args, key) is None:
            setattr(args, key, [value] if key == "train_batch" else value)
    positive = ("size", "ensemble", "steps", "sample_batch", "repeats", "reference_steps", "reference_steps_measured",
                "train_iters")
    if min(args.train_batch) < 1:
        p.error("--train-batch must be >= 1")
    for key in positive:
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.steps > args.reference_steps:
        p.error("--steps must not exceed --reference-steps (the training T the sampler uses)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    now = _dt.datetime.now()
    date = now.strftime("%Y-%m-%d")

    preset = dict(PRESETS[args.preset])
    if args.condition_backbone:
        preset["condition_backbone"] = args.condition_backbone
    try:
        network = MedSegDiffV2(
            spatial_dims=args.spatial_dims, in_channels=args.in_channels, num_classes=args.num_classes,
            condition_channels=args.condition_channels, **preset,
        ).to(device)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    if args.fp32_norm:  # the A/B of GroupNorm under autocast: torch's own module, which CUDA autocast runs in fp32
        for module in network.modules():
            if isinstance(module, GroupNorm):
                module.__class__ = torch.nn.GroupNorm
    if args.size % network.divisor:
        raise SystemExit(f"--size {args.size} must be a multiple of {network.divisor} for this preset")
    n_params = sum(p.numel() for p in network.parameters())

    out = args.out or default_out(device, date)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update({
        "channels": list(preset["channels"]),
        "condition_channels": list(args.condition_channels or preset["channels"]),
        "num_res_blocks": preset["num_res_blocks"],
        "condition_backbone": network.condition_backbone,
        "parameter_count": n_params,
        "input_shape": [args.in_channels] + [args.size] * args.spatial_dims,
        "torch_num_threads": torch.get_num_threads(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    })
    result: dict = {
        "device": device_name(device),
        "device_type": device.type,
        "torch_version": torch.__version__,
        "monai_version": monai.__version__,
        "python_version": platform.python_version(),
        "date": date,
        "timestamp": now.isoformat(timespec="seconds"),
        "settings": settings,
        "complete": False,
        "phases": {},
    }
    phases = result["phases"]

    def checkpoint(name: str) -> None:
        """Write what is measured so far: a run cut short (a device call's time limit) keeps its finished phases."""
        summarize(result, args)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"[speed.py] {name} done, written to {out}", flush=True)

    if not args.skip_train:  # first, so that the CPU peak-RSS growth is attributable to it
        if args.compile and len(args.train_batch) > 1:
            # one static graph per batch size (after a second shape dynamo would otherwise switch to a dynamic-shape
            # graph, which is not what a training run with one batch size gets)
            torch._dynamo.config.automatic_dynamic_shapes = False
        runs = []
        for batch in args.train_batch:
            runs.append(bench_train(args, network, device, batch))
            phases["train"] = pick_train_run(runs, args.train_mem_limit_gb)
            if len(args.train_batch) > 1:
                phases["train_by_batch"] = runs
            checkpoint(f"train batch {batch}")
    network.zero_grad(set_to_none=True)
    phases["fast"], one_more_call = bench_fast(args, network, device)
    checkpoint("fast path")
    phases["reference"] = bench_reference(args, network, device)
    checkpoint("reference mode")
    if args.profile > 0:  # last: after the timed calls (its overhead stays out of them) and after the reference
        set_layout(args, network)
        with torch.no_grad():
            phases["fast"]["profile"] = profile_ops(one_more_call, device, args.profile)
    result["complete"] = True
    checkpoint("profile" if args.profile > 0 else "all phases")
    print_table(result, args)
    print(f"\nwrote {out}")
    return result


def summarize(result: dict, args) -> None:
    """The top-level keys (size-independent and size-named ones, e.g. ``ensemble5_latency_s_256``) from the phases
    measured so far."""
    phases, s, n = result["phases"], args.size, args.ensemble
    if "fast" in phases:
        result["ensemble_latency_s"] = phases["fast"]["latency_per_image_s"]
        result[f"ensemble{n}_latency_s_{s}"] = phases["fast"]["latency_per_image_s"]
    if "reference" in phases:
        result["reference_latency_s"] = phases["reference"]["latency_per_image_s"]
        result["reference_extrapolated"] = phases["reference"]["extrapolated"]
        result[f"reference_latency_s_{s}"] = phases["reference"]["latency_per_image_s"]
    if "fast" in phases and "reference" in phases:
        result["speedup"] = phases["reference"]["latency_per_image_s"] / phases["fast"]["latency_per_image_s"]
    if "train" in phases:
        tr = phases["train"]
        result["train_img_per_s"] = tr["img_per_s"]
        result[f"train_img_per_s_{s}"] = tr["img_per_s"]
        if args.spatial_dims == 3:
            result["train_voxels_per_s"] = tr["voxels_per_s"]
            result[f"train_voxels_per_s_{s}"] = tr["voxels_per_s"]
        result["train_peak_mem_gb"] = tr["peak_mem_gb"]
        result["train_peak_mem_kind"] = tr["peak_mem_kind"]
    result["phases"] = result.pop("phases")  # keep the phases last, after the summary keys


def print_table(result: dict, args) -> None:
    s, dims = args.size, args.spatial_dims
    shape = "x".join([str(s)] * dims)
    ph = result["phases"]
    ref, fast = ph["reference"], ph["fast"]
    opts = [o for o, on in (("bf16", args.amp), ("channels-last", args.channels_last),
                            (f"compile {args.compile_mode}", args.compile)) if on]
    rows = [
        ("device", result["device"]),
        ("model", f"preset {args.preset}, {result['settings']['parameter_count'] / 1e6:.1f} M parameters, {dims}D {shape}"),
    ]
    if "train" in ph:
        tr = ph["train"]
        unit = f"{tr['img_per_s']:.2f} img/s" if dims == 2 else f"{tr['voxels_per_s'] / 1e6:.2f} Mvoxel/s ({tr['img_per_s']:.3f} patch/s)"
        for run in ph.get("train_by_batch", []):
            rows.append((f"  train batch {run['batch']}", f"{run['img_per_s']:.2f} img/s, {run['peak_mem_gb']:.2f} GB"))
        rows += [
            (f"train throughput (batch {tr['batch']}{', compiled' if tr['compiled'] else ''})", unit),
            ("train peak memory", f"{tr['peak_mem_gb']:.3f} GB [{tr['peak_mem_kind']}]"),
        ]
    rows += [
        (f"fast: dpmpp {args.steps} steps, ensemble {args.ensemble}" + (f" [{', '.join(opts)}]" if opts else ""),
         f"{fast['latency_per_image_s']:.3f} s/image (condition calls per call: {fast['condition_calls_per_call']:g})"),
        (f"reference: ddpm {ref['reference_steps']} x {ref['ensemble']} members, fp32",
         f"{ref['latency_per_image_s']:.3f} s/image"
         + (f" (extrapolated from {ref['measured_steps']} steps, {ref['per_step_s']:.4f} s/step)" if ref["extrapolated"] else " (measured)")),
        ("speedup (reference / fast)", f"{result['speedup']:.1f}x"),
    ]
    if "profile" in fast:
        prof = fast["profile"]
        rows.append((f"fast-path profile ({prof['time_kind']}, per call)",
                     ", ".join(f"{k} {v['percent']:.0f}%" for k, v in prof["by_kind"].items())))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
