"""Peak training memory of one MedSegDiff-V2 training step, from a model fitted to measurements.

What is predicted
-----------------
The peak of the memory allocated by tensors (bytes) during one step of the bundle's training iteration
(:class:`medsegdiff_bundle.engine.DiffusionTrainIteration`): ``zero_grad(set_to_none=False)`` (MONAI's
``SupervisedTrainer`` default), :func:`~medsegdiff_bundle.diffusion.diffusion_forward`, ``backward``, gradient
clipping, ``AdamW.step`` and the EMA update, in steady state (gradients, AdamW moments and the EMA copy already
exist). Not included: the framework itself (CPU: the loaded libraries, ~0.6 GB of RSS; GPU: the CUDA context and
the caching allocator's slack), the data loader and validation.

The model
---------
``total = static + max(activation_peak, optimizer_workspace)`` with

* ``static = 4 P (weights) + 4 P (gradients) + 8 P (AdamW exp_avg, exp_avg_sq) + 4 P (EMA copy, ema=True)``
  bytes, fp32; ``P`` is the exact parameter count of :class:`~medsegdiff_bundle.networks.MedSegDiffV2`, obtained
  by instantiating the network on the ``meta`` device (no memory, a few milliseconds; cached).
* ``activation_peak = overhead_factor * activations``: the bytes saved for backward plus what the backward pass
  allocates on top of them (gradients of the activations, convolution workspaces). ``overhead_factor`` is the
  least-squares ratio (through the origin) of the measured peak growth of real training steps to the
  predicted saved bytes, on the small "fit" configurations of ``benchmarks/memory_fit.py``.
* ``activations = sum_k coef_k * feature_k`` (bytes; :func:`activation_features`), with ``B`` the batch,
  ``V_l`` the voxels of level ``l`` (``prod(patch) / 2**(dims*l)``), ``w_l`` the width of level ``l``,
  ``L`` the number of levels, ``N = V_{L-1}`` the bottleneck tokens, ``M`` the mask channels, ``C_in`` the image
  channels, ``h`` the SS-Former heads and ``u = 4`` the SS-Former attention units (2 blocks x 2)::

      levels           = B * sum_l V_l * w_l                 every block/down/up/skip tensor of both UNets   
      extra_res_blocks = B * (num_res_blocks - 1) * sum_l V_l * w_l
      bottleneck       = B * N * w_{L-1}                     middle blocks + SS-Former tokens, NBP-Filter spectra
      full_res_io      = B * V_0 * (C_in + M)                image, noisy mask, anchor/U-SA maps, loss tensors
      attention        = B * h * N**2 * u                    SS-Former attention weights (see below)

  The coefficients are fitted by non-negative least squares on *relative* errors (each row divided by its
  measurement) to the bytes saved for backward, measured with ``torch.autograd.graph.saved_tensors_hooks``
  (sum of ``nbytes`` of the unique storages packed during one forward of ``diffusion_forward``, parameters
  excluded since they are in ``static``) on CPU at small 2D/3D patch sizes, several widths/depths, 1-2 residual
  blocks, 1-4 input channels and binary/multi-class masks (:func:`measure_saved_activations`).
  The ``attention`` term is real: the SS-Former's band-passed queries/keys leave ``_band_pass`` with a non-unit
  stride in the last dimension, so ``scaled_dot_product_attention`` falls back to its math kernel (CPU and CUDA
  alike), which keeps the ``h x N x N`` attention weights for backward (fitted 1.0 bytes per element, 5.5 in the fit
  before bundle 0.4.0: the term is small at the fit sizes, so the fit trades it against the bottleneck term).
  Should the SS-Former make them contiguous (flash/memory-efficient kernels, no ``N**2`` memory), rerun
  ``benchmarks/memory_fit.py``: the coefficient then drops to ~0.
* ``optimizer_workspace``: the peak growth during ``clip_grad_norm_`` + ``AdamW.step`` (foreach temporaries),
  ``optimizer_factor * 4 P``; it only matters for tiny patches.
* ``amp=True``: the activations are multiplied by ``amp_activation_ratio`` (measured under CPU bf16 autocast)
  and the bf16 weight copies that autocast keeps for backward (``2 P``) are added. CUDA autocast runs torch's
  GroupNorm in fp32; the package's own ``GroupNorm`` (bundle 0.3.0) stays bf16, and with it the prediction held on
  an H200 (2D 256², default widths, batch 8-32: measured peaks 0.89-0.91× the prediction, 1.34-1.37× with torch's
  GroupNorm; that was the residual condition UNet of bundle 0.3, not yet rerun with the plain one). The planner
  still budgets with the fp32 prediction (an upper bound) until 3D is measured on a GPU -- see
  :mod:`medsegdiff_bundle.planning.planner`.

Fitted on torch 2.13 CPU (``memory_model.json``, bundle 0.4.0's default network: plain condition UNet):
coefficients (bytes/element) levels 132.1, extra_res_blocks 55.0, bottleneck 307.7, full_res_io 34.8, attention
1.0; largest fit residual 3.1% (17 configurations); ``overhead_factor`` 1.045 (2D 96^2 b2: 1.029, 3D 40^3 b1:
1.058); ``amp_activation_ratio`` 0.529. Held-out validation (predicted vs measured peak): 2D 128^2/192^2/256^2 b2
(widths 32..256) +1.2%/+2.3%/+3.7%, 3D 48^3/64^3 b1 (widths 16..128) -0.9%/-0.7%. Known CPU-only gap: PyTorch sends
small 3D convolutions (input below ~1M elements) to its im2col ``Slow3d`` kernel, whose transient column buffer
(``C_in * 27 * V * 4`` bytes) the model leaves out (3D 32^3, widths 16..: 1.47x the saved activations); cuDNN and
the CPU mkldnn path for larger inputs have none.

Validation (``benchmarks/memory_fit.py``): a training step run in a fresh process per configuration,
peak measured with ``torch.profiler`` (``profile_memory=True``: every allocation/free of PyTorch's CPU allocator,
summed in time order; exactly reproducible run to run) and cross-checked with the growth of the peak RSS under
``MALLOC_MMAP_THRESHOLD_=65536`` (glibc then returns big blocks to the OS at ``free``; without it, heap
fragmentation inflates and scatters RSS by ~15%). The fitted coefficients, the measurement tables, the residuals,
predicted vs measured peaks, the torch version and the date are in ``memory_model.json`` next to this file.
On a CUDA machine the same script also measures ``torch.cuda.max_memory_allocated`` (that path is not exercised
on the CPU development machines).
"""

from __future__ import annotations

import functools
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "FEATURE_NAMES",
    "MEMORY_MODEL_PATH",
    "MemoryEstimate",
    "activation_features",
    "count_parameters",
    "load_memory_model",
    "measure_saved_activations",
    "measure_training_peak",
    "predict_activation_bytes",
    "predict_training_memory",
    "ss_heads",
]

MEMORY_MODEL_PATH = Path(__file__).with_name("memory_model.json")
FEATURE_NAMES = ("levels", "extra_res_blocks", "bottleneck", "full_res_io", "attention")
SS_ATTENTION_UNITS = 4  # MedSegDiffV2 default: 2 SS-Former blocks x 2 cross-attention units
GIB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak training memory, in bytes, and its parts."""

    parameters: int
    weights: int
    gradients: int
    optimizer: int
    ema: int
    amp_weight_copies: int
    activations: int
    activation_peak: int
    optimizer_workspace: int
    total: int

    @property
    def total_gb(self) -> float:
        return self.total / GIB

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def ss_heads(bottleneck_width: int) -> int:
    """SS-Former heads chosen by :class:`~medsegdiff_bundle.networks.ssformer.SSFormer` when ``num_heads=None``."""
    return max(1, min(4, int(bottleneck_width) // 32))


@functools.lru_cache(maxsize=256)
def _count_parameters(
    spatial_dims: int, in_channels: int, num_classes: int, channels: tuple, num_res_blocks: int
) -> int:
    import torch

    from ..networks.medsegdiff import MedSegDiffV2

    with torch.device("meta"):
        net = MedSegDiffV2(spatial_dims, in_channels, num_classes, channels=channels, num_res_blocks=num_res_blocks)
    return int(sum(p.numel() for p in net.parameters()))


def count_parameters(
    spatial_dims: int, in_channels: int, num_classes: int, channels: Sequence[int], num_res_blocks: int = 1
) -> int:
    """Exact trainable-parameter count of ``MedSegDiffV2`` (built on the meta device, cached)."""
    return _count_parameters(int(spatial_dims), int(in_channels), int(num_classes),
                             tuple(int(c) for c in channels), int(num_res_blocks))


def _level_voxels(patch_size: Sequence[int], levels: int) -> list[float]:
    voxels = []
    for level in range(levels):
        v = 1.0
        for s in patch_size:
            v *= max(1, int(s) // 2**level)
        voxels.append(v)
    return voxels


def activation_features(
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    channels: Sequence[int],
    num_res_blocks: int,
    patch_size: Sequence[int],
    batch_size: int,
) -> dict[str, float]:
    """The regressors of the activation model (element counts; see the module docstring)."""
    if len(patch_size) != spatial_dims:
        raise ValueError(f"patch_size {list(patch_size)} needs {spatial_dims} values.")
    channels = [int(c) for c in channels]
    b = float(batch_size)
    voxels = _level_voxels(patch_size, len(channels))
    level_sum = sum(v * w for v, w in zip(voxels, channels))
    n_tokens = voxels[-1]
    mask = 1 if num_classes == 2 else int(num_classes)
    return {
        "levels": b * level_sum,
        "extra_res_blocks": b * (int(num_res_blocks) - 1) * level_sum,
        "bottleneck": b * n_tokens * channels[-1],
        "full_res_io": b * voxels[0] * (int(in_channels) + mask),
        "attention": b * ss_heads(channels[-1]) * n_tokens**2 * SS_ATTENTION_UNITS,
    }


@functools.lru_cache(maxsize=4)
def _load(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_memory_model(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The fitted model (``memory_model.json``, written by ``benchmarks/memory_fit.py``)."""
    path = Path(path) if path is not None else MEMORY_MODEL_PATH
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run `python benchmarks/memory_fit.py` to measure and fit it.")
    return _load(str(path.resolve()))


def predict_activation_bytes(features: dict[str, float], coefficients: dict[str, float]) -> float:
    """``sum_k coef_k * feature_k`` (bytes saved for backward, fp32)."""
    return float(sum(float(coefficients.get(k, 0.0)) * float(features[k]) for k in FEATURE_NAMES))


def predict_training_memory(
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    channels: Sequence[int],
    num_res_blocks: int,
    patch_size: Sequence[int],
    batch_size: int,
    amp: bool = False,
    ema: bool = True,
    model: dict[str, Any] | None = None,
) -> MemoryEstimate:
    """Predict the peak memory (bytes) of one training step; see the module docstring for the model.

    Args:
        spatial_dims, in_channels, num_classes, channels, num_res_blocks: the ``MedSegDiffV2`` arguments.
        patch_size: spatial size of a training sample.
        batch_size: samples per step (per GPU).
        amp: bf16 autocast.
        ema: count the EMA copy of the weights the bundle keeps.
        model: the fitted model dict (default: :func:`load_memory_model`).
    """
    model = model if model is not None else load_memory_model()
    p = count_parameters(spatial_dims, in_channels, num_classes, channels, num_res_blocks)
    feats = activation_features(
        spatial_dims, in_channels, num_classes, channels, num_res_blocks, patch_size, batch_size
    )
    act = predict_activation_bytes(feats, model["coefficients"])
    amp_copies = 0
    if amp:
        act *= float(model["amp_activation_ratio"])
        amp_copies = 2 * p
    act_peak = float(model["overhead_factor"]) * act + amp_copies
    opt_ws = float(model["optimizer_factor"]) * 4 * p
    weights, grads, optim, ema_b = 4 * p, 4 * p, 8 * p, (4 * p if ema else 0)
    total = weights + grads + optim + ema_b + max(act_peak, opt_ws)
    return MemoryEstimate(
        parameters=p, weights=weights, gradients=grads, optimizer=optim, ema=ema_b, amp_weight_copies=amp_copies,
        activations=int(round(act)), activation_peak=int(round(act_peak)), optimizer_workspace=int(round(opt_ws)),
        total=int(round(total)),
    )


# ---------------------------------------------------------------------------------------------------------------
# measurement (used by benchmarks/memory_fit.py and the live test)
# ---------------------------------------------------------------------------------------------------------------


def _make_batch(spatial_dims: int, in_channels: int, num_classes: int, patch_size: Sequence[int], batch_size: int,
                device: Any = "cpu", seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    shape = (int(batch_size),) + tuple(int(s) for s in patch_size)
    image = torch.randn((shape[0], int(in_channels)) + shape[1:], generator=g)
    label = torch.randint(0, int(num_classes), (shape[0], 1) + shape[1:], generator=g)
    return image.to(device), label.to(device)


def _build(cfg: dict[str, Any], device: Any = "cpu"):
    import torch

    from ..diffusion import MedSegDiffLoss, make_scheduler
    from ..networks.medsegdiff import MedSegDiffV2

    torch.manual_seed(0)
    net = MedSegDiffV2(cfg["spatial_dims"], cfg["in_channels"], cfg["num_classes"], channels=tuple(cfg["channels"]),
                       num_res_blocks=cfg.get("num_res_blocks", 1)).to(device)
    scheduler = make_scheduler("ddpm", prediction_type="sample")
    loss_fn = MedSegDiffLoss(cfg["num_classes"])
    return net, scheduler, loss_fn


def measure_saved_activations(
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    channels: Sequence[int],
    num_res_blocks: int,
    patch_size: Sequence[int],
    batch_size: int,
    amp: bool = False,
    network: Any = None,
    device: Any = None,
) -> int:
    """Bytes saved for backward by one training forward (in this process; on ``device``, default the network's, or
    CPU when the network is built here).

    Every tensor packed by autograd during ``diffusion_forward`` is recorded through
    ``torch.autograd.graph.saved_tensors_hooks``; the result is the sum of ``nbytes`` of the unique underlying
    storages, parameters excluded (views of one storage count once).
    """
    import torch

    from ..diffusion import diffusion_forward

    from ..diffusion import MedSegDiffLoss, make_scheduler

    if network is None:
        cfg = dict(spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes,
                   channels=list(channels), num_res_blocks=num_res_blocks)
        network = _build(cfg)[0]
    net = network
    scheduler = make_scheduler("ddpm", prediction_type="sample")
    loss_fn = MedSegDiffLoss(num_classes)
    net.train()
    param_ptrs = {p.untyped_storage().data_ptr() for p in net.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in param_ptrs and ptr != 0:
            storages[ptr] = max(storages.get(ptr, 0), s.nbytes())
        return t

    if device is None:
        device = next(net.parameters()).device
    device = torch.device(device)
    image, label = _make_batch(spatial_dims, in_channels, num_classes, patch_size, batch_size, device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(amp)):
            out = diffusion_forward(net, scheduler, loss_fn, image, label, gen)
    total = int(sum(storages.values()))
    del out
    return total


def _train_step(net, ema, opt, scheduler, loss_fn, image, label, amp: bool, gen) -> None:
    """The bundle's training iteration (``DiffusionTrainIteration``) without the engine."""
    import torch

    from ..diffusion import diffusion_forward

    opt.zero_grad(set_to_none=False)
    with torch.autocast(device_type=image.device.type, dtype=torch.bfloat16, enabled=bool(amp)):
        loss = diffusion_forward(net, scheduler, loss_fn, image, label, gen)["loss"]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    if ema is not None:
        ema.update(net)


def _proc_status_bytes(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` (peak RSS of this process's address space) from ``/proc/self/status``, in bytes."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0: write 5 to ``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _profiler_peak(prof) -> tuple[int, int, int]:
    """(allocated before the measured step, peak during it, peak during its optimiser part) from memory events."""
    events = list(prof.profiler.kineto_results.events())
    marks = {e.name(): (e.start_ns(), e.start_ns() + e.duration_ns()) for e in events
             if e.name() in ("measured_step", "measured_optimizer")}
    start, end = marks["measured_step"]
    opt_start, opt_end = marks["measured_optimizer"]
    mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    cur, before, peak, opt_peak = 0, None, 0, 0
    for t, nbytes in mem:
        if t >= start and before is None:
            before = cur
        cur += nbytes
        if start <= t <= end:
            peak = max(peak, cur)
        if opt_start <= t <= opt_end:
            opt_peak = max(opt_peak, cur)
    before = cur if before is None else before
    return before, max(peak, before), max(opt_peak, before)


def _child_measure(cfg: dict[str, Any]) -> dict[str, Any]:
    """Runs inside a fresh process: build, warm up at a tiny size, then measure one step at ``patch_size``."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from ..engine.ema import EMAModel

    method = cfg["method"]
    device = torch.device("cuda" if method == "cuda" else "cpu")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    amp = bool(cfg.get("amp", False))
    prof = None
    if method == "profiler":
        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        prof.start()
    net, scheduler, loss_fn = _build(cfg, device)
    ema = EMAModel(net) if cfg.get("ema", True) else None
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)
    dims = cfg["spatial_dims"]
    divisor = 2 ** (len(cfg["channels"]) - 1)
    tiny = _make_batch(dims, cfg["in_channels"], cfg["num_classes"], [divisor * 2] * dims, 1, device)
    net.train()
    _train_step(net, ema, opt, scheduler, loss_fn, *tiny, amp, gen)  # creates grads + AdamW state
    del tiny
    gc.collect()
    out: dict[str, Any] = {"method": method, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if method == "rss":
        out["peak_reset"] = _reset_peak_rss()
        base = _proc_status_bytes("VmRSS")
        out["rss_base"] = base
    if method == "cuda":
        torch.cuda.synchronize()
        base_cuda = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with record_function("measured_step"):
        image, label = _make_batch(dims, cfg["in_channels"], cfg["num_classes"], cfg["patch_size"],
                                   cfg["batch_size"], device)
        opt.zero_grad(set_to_none=False)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            from ..diffusion import diffusion_forward

            loss = diffusion_forward(net, scheduler, loss_fn, image, label, gen)["loss"]
        loss.backward()
        del loss
        with record_function("measured_optimizer"):
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            if ema is not None:
                ema.update(net)
    out["step_seconds"] = time.perf_counter() - t0
    if method == "profiler":
        prof.stop()
        before, peak, opt_peak = _profiler_peak(prof)
        out.update(static=before, peak=peak, delta=peak - before, optimizer_delta=opt_peak - before)
        if cfg.get("saved"):  # after the measured window: does not disturb it
            del image, label
            out["saved_bytes"] = measure_saved_activations(
                dims, cfg["in_channels"], cfg["num_classes"], cfg["channels"], cfg.get("num_res_blocks", 1),
                cfg["patch_size"], cfg["batch_size"], amp=amp, network=net)
    elif method == "rss":
        peak = _proc_status_bytes("VmHWM")
        out.update(rss_peak=peak, delta=peak - base)
    else:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        out.update(static=base_cuda, peak=peak, delta=peak - base_cuda)
    return out


def _child_main() -> None:
    cfg = json.loads(sys.argv[1])
    print("MEMORY_RESULT " + json.dumps(_child_measure(cfg)), flush=True)


def measure_training_peak(
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    channels: Sequence[int],
    num_res_blocks: int,
    patch_size: Sequence[int],
    batch_size: int,
    amp: bool = False,
    ema: bool = True,
    method: str = "profiler",
    threads: int | None = None,
    timeout: float = 600.0,
    saved: bool = False,
) -> dict[str, Any]:
    """Measure one real training step in a fresh Python process.

    The child builds the model, the EMA copy and AdamW, runs one warm-up step at a tiny size (so that gradients
    and AdamW moments exist, as in steady state) and then measures one step at ``patch_size``/``batch_size``.

    Args:
        method: ``"profiler"``: ``torch.profiler`` with ``profile_memory=True`` from before the model is built;
            ``static`` = bytes allocated before the measured step, ``peak`` = the maximum of the running sum of
            allocations and frees during it (``delta = peak - static``). ``"rss"``: growth of the peak RSS over the
            RSS after the warm-up (``delta`` only; ``VmHWM`` of ``/proc/self/status``, reset after the warm-up, not
            ``ru_maxrss``, which Linux carries over from the forking parent), run with
            ``MALLOC_MMAP_THRESHOLD_=65536``. ``"cuda"``:
            ``torch.cuda.max_memory_allocated`` (needs a GPU).
        threads: torch intra-op threads in the child (default: torch's default).
        saved: (profiler) also return ``saved_bytes`` (:func:`measure_saved_activations`, run after the window).

    Returns:
        the child's result dict (``delta`` always; ``static``/``peak`` for profiler and cuda).
    """
    if method not in ("profiler", "rss", "cuda"):
        raise ValueError(f"method must be profiler, rss or cuda, got {method!r}.")
    cfg = dict(spatial_dims=int(spatial_dims), in_channels=int(in_channels), num_classes=int(num_classes),
               channels=[int(c) for c in channels], num_res_blocks=int(num_res_blocks),
               patch_size=[int(s) for s in patch_size], batch_size=int(batch_size), amp=bool(amp), ema=bool(ema),
               method=method, threads=threads, saved=bool(saved))
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if method == "rss":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    code = "from medsegdiff_bundle.planning.memory import _child_main; _child_main()"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=root)
    for line in proc.stdout.splitlines():
        if line.startswith("MEMORY_RESULT "):
            return json.loads(line[len("MEMORY_RESULT "):])
    raise RuntimeError(f"memory measurement failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
