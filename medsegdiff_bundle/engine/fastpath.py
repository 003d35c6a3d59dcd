"""Fast-path switches shared by :class:`DiffusionSegInferer` and :class:`DiffusionTrainIteration`: channels-last
memory layout and ``torch.compile``, and where bf16 autocast pays (:func:`bf16_is_fast`).

Neither switch changes what a network *is*:

* channels-last only changes the strides of the ``(spatial_dims + 2)``-D weights (the convolution kernels). Values,
  parameter objects and ``state_dict`` keys stay the same, so optimisers keep their references and checkpoints
  load into a network of either layout (``load_state_dict`` copies values into the destination's layout).
* compilation never replaces or patches the module. A module-level function that takes the network as its first
  argument is compiled, and the sampler or the loss sees a :class:`CompiledNetwork` view that routes the per-step
  call through it. So ``state_dict`` keys carry no ``_orig_mod.`` prefix, nothing unpicklable is stored on the
  module, and the EMA's ``deepcopy`` of it copies a plain network.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .ema import unwrap_model

__all__ = [
    "COMPILE_MODES",
    "CompiledNetwork",
    "bf16_is_fast",
    "channels_last_format",
    "check_compile_mode",
    "compile_network_calls",
    "compile_training_calls",
    "replays_cudagraphs",
    "to_channels_last",
    "without_cudagraphs",
]

# ``torch.compile``'s modes; the two that replay CUDA graphs need the bookkeeping in :class:`CompiledNetwork`
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def bf16_is_fast(device: torch.device | str) -> bool:
    """Whether ``device`` runs bf16 natively, so that bf16 autocast (``amp``) is the faster path there; the default of
    ``amp`` in ``train.json``, ``inference.json`` and ``evaluate.json``.

    * CUDA: GPUs with bf16 tensor cores (Ampere and later); older ones (e.g. V100, T4) only emulate bf16.
    * CPU: processors with AVX512-BF16 or AMX, whose bf16 instructions oneDNN's convolutions and matrix products use.
      Measured on a 2-core AMD EPYC with AVX512-BF16 (``small`` preset, 256², ensemble 5, mirrored, channels-last):
      7.0-8.0 s per image against 11.9-13.3 s in fp32 (``benchmarks/results/speed_cpu-2c_2026-11-27.json``). Other
      CPUs only emulate bf16 and keep fp32 (not measured: no such CPU was at hand).
    * anything else (MPS, XPU, ...): ``False``, fp32 as before.

    Args:
        device: the device the network runs on (``torch.device`` or its name, e.g. ``"cuda:1"``).
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        with torch.cuda.device(device):
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        # private probes (torch has no public one); absent in some builds, where fp32 stays the safe choice
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)
    return False


def channels_last_format(spatial_dims: int) -> torch.memory_format:
    """``torch.channels_last`` for 2D feature maps ``(B, C, H, W)``, ``torch.channels_last_3d`` for 3D ones."""
    if spatial_dims == 2:
        return torch.channels_last
    if spatial_dims == 3:
        return torch.channels_last_3d
    raise ValueError(f"channels-last layouts exist for spatial_dims 2 and 3, got {spatial_dims}.")


def to_channels_last(module: nn.Module, enabled: Any = True, spatial_dims: int | None = None) -> nn.Module:
    """Convert ``module``'s ``(spatial_dims + 2)``-D parameters and buffers to the channels-last layout, in place.

    Submodules with ``keeps_contiguous_layout`` true (the plain condition UNet with instance norm, which has no
    channels-last path in torch) and everything inside them are made contiguous instead (also after a
    ``Module.to(memory_format=...)``); ``MedSegDiffV2`` hands them contiguous inputs and converts their outputs
    back. The Parameter objects are kept (their ``.data`` is replaced, like ``Module.to`` does), so an optimiser
    built before still steps the same tensors. Returns ``module`` so that a config can write
    ``to_channels_last(@network_def, @channels_last).to(@device)`` (``.to(device)`` keeps the layout).

    Args:
        module: the network (a DDP / EMA wrapper is unwrapped to read ``spatial_dims``; its tensors are converted).
        enabled: ``False`` (or ``"false"`` from a command line) returns ``module`` unchanged.
        spatial_dims: 2 or 3; ``None`` reads ``module.spatial_dims`` (``MedSegDiffV2`` has it), else 2.
    """
    from ..utils import as_bool

    if not as_bool(enabled, "channels_last"):
        return module
    if spatial_dims is None:
        spatial_dims = int(getattr(unwrap_model(module), "spatial_dims", 2))
    fmt = channels_last_format(spatial_dims)
    rank = spatial_dims + 2
    # parts that run contiguous (the plain condition UNet: instance norm has no channels-last path)
    kept = {id(m) for part in module.modules() if getattr(part, "keeps_contiguous_layout", False)
            for m in part.modules()}
    with torch.no_grad():
        for sub in module.modules():
            layout = torch.contiguous_format if id(sub) in kept else fmt
            for param in sub.parameters(recurse=False):
                if param.ndim == rank:
                    param.data = param.data.contiguous(memory_format=layout)
                    if param.grad is not None:
                        param.grad = param.grad.contiguous(memory_format=layout)
            for name, buffer in list(sub.named_buffers(recurse=False)):
                if buffer is not None and buffer.ndim == rank:
                    setattr(sub, name, buffer.contiguous(memory_format=layout))  # keeps the buffer's persistence
    return module


def replays_cudagraphs(backend: str | Callable, mode: str) -> bool:
    """Whether ``torch.compile(backend=backend, mode=mode)`` replays CUDA graphs (inductor's ``"reduce-overhead"`` and
    ``"max-autotune"``, and the ``"cudagraphs"`` backend): a replay writes its outputs into the same buffers every time,
    which :class:`CompiledNetwork` has to account for."""
    return backend == "cudagraphs" or (backend == "inductor" and check_compile_mode(mode) in _CUDAGRAPH_MODES)


def without_cudagraphs(mode: str) -> str:
    """The compile mode that fuses as ``mode`` does but replays no CUDA graphs (``"reduce-overhead"`` ->
    ``"default"``, ``"max-autotune"`` -> ``"max-autotune-no-cudagraphs"``; the others unchanged).

    The training iteration compiles with it: on an H200 (torch 2.11), the backward of a training forward replayed as a
    CUDA graph read activations that a later replay had already overwritten, so graphs serve sampling only.
    """
    graphless = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}
    return graphless.get(check_compile_mode(mode), mode)


def check_compile_mode(mode: str, name: str = "compile_mode") -> str:
    """Return ``mode`` if it is one of :data:`COMPILE_MODES`, else raise a ``ValueError`` naming the setting."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"{name} must be one of {COMPILE_MODES}, got {mode!r}.")
    return mode


def _call_forward(network: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return network(*args, **kwargs)


def _call_denoise(network: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return network.denoise(*args, **kwargs)


class CompiledNetwork:
    """A view of ``network`` whose ``__call__`` and ``denoise`` run through compiled functions.

    Every other attribute (``condition``, ``num_classes``, ``module``, ...) is the network's own, so the view can be
    handed to :class:`~medsegdiff_bundle.diffusion.DiffusionSampler` or ``diffusion_forward`` unchanged. The view is
    cheap and holds no compiled code of its own: build one per call with :func:`compile_network_calls`.

    With ``cudagraphs=True`` (the compile modes that replay CUDA graphs) every call starts a new CUDA-graph step
    (``torch.compiler.cudagraph_mark_step_begin``), and ``denoise`` returns a copy of its output: a replay writes
    its outputs into the same static buffers, and the multistep solvers keep earlier steps' predictions, which the
    next replay would otherwise overwrite. (The training forward's outputs are consumed within their iteration.)

    Args:
        network: the network (a DDP wrapper included: calling the view then goes through DDP's forward, so
            gradients are still synchronised).
        forward: compiled ``(network, *args) -> network(*args)``, or ``None`` for the eager call.
        denoise: compiled ``(network, *args) -> network.denoise(*args)``, or ``None`` for the eager method.
        cudagraphs: the compiled functions replay CUDA graphs.
    """

    def __init__(self, network: nn.Module, forward: Callable | None = None, denoise: Callable | None = None,
                 cudagraphs: bool = False) -> None:
        self.network = network
        self._forward = forward
        self._denoise = denoise
        self._cudagraphs = cudagraphs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._forward is None:
            return self.network(*args, **kwargs)
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        return self._forward(self.network, *args, **kwargs)

    def denoise(self, *args: Any, **kwargs: Any) -> Any:
        if self._denoise is None:
            return unwrap_model(self.network).denoise(*args, **kwargs)
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = self._denoise(unwrap_model(self.network), *args, **kwargs)
        return out.clone() if self._cudagraphs else out

    def __getattr__(self, name: str) -> Any:
        # only reached for names the view does not define; "network" is checked so that copy/pickle of a
        # half-built view cannot recurse
        if name == "network":
            raise AttributeError(name)
        return getattr(self.network, name)


def compile_network_calls(backend: str | Callable = "inductor", forward: bool = True, denoise: bool = True,
                          mode: str = "default") -> Callable[[nn.Module], CompiledNetwork]:
    """``torch.compile`` the per-step calls once; return ``view(network) -> CompiledNetwork``.

    The compiled functions take the network as an argument, so one of them serves every network passed later:
    dynamo compiles it on the first call for a given network architecture, input shape, dtype and autocast
    state, and reuses that code on every later call (another network or shape adds one compilation; none is
    ever repeated per call or per sampler step, see the tests).

    Args:
        backend: a ``torch.compile`` backend: ``"inductor"`` (default; on CPU it needs a C++ compiler),
            ``"aot_eager"`` (traces and runs eagerly, no code generation: cheap, used by the CPU tests),
            ``"cudagraphs"`` (replays the traced calls as CUDA graphs without generating kernels: no launch gaps, and
            seconds rather than a minute to compile; CUDA only), or a callable backend.
        forward: compile ``network(*args)`` (training).
        denoise: compile ``network.denoise(*args)`` (the call every sampler step makes).
        mode: inductor's compile mode, one of :data:`COMPILE_MODES`. ``"default"`` fuses kernels;
            ``"reduce-overhead"`` also replays each compiled call as a CUDA graph, which removes the per-kernel launch
            cost (the GPU idles between small kernels otherwise; CUDA only, the first calls record the graphs);
            ``"max-autotune"`` and ``"max-autotune-no-cudagraphs"`` also benchmark kernel choices while compiling
            (much longer compilation). Other backends ignore it.
    """
    check_compile_mode(mode)
    # only inductor takes a mode (aot_eager and callables would be handed an unknown keyword)
    options = {"mode": mode} if backend == "inductor" else {}
    compiled_forward = torch.compile(_call_forward, backend=backend, **options) if forward else None
    compiled_denoise = torch.compile(_call_denoise, backend=backend, **options) if denoise else None
    cudagraphs = replays_cudagraphs(backend, mode)

    def view(network: nn.Module) -> CompiledNetwork:
        return CompiledNetwork(network, compiled_forward, compiled_denoise, cudagraphs)

    return view


def compile_training_calls(backend: str | Callable = "inductor",
                           mode: str = "default") -> Callable[[nn.Module], CompiledNetwork] | None:
    """:func:`compile_network_calls` for the training step (``forward`` only), never replaying CUDA graphs: replayed,
    the training forward's saved activations were overwritten before its backward read them (H200, torch 2.11).
    The graph modes compile as :func:`without_cudagraphs` says; a backend that does nothing but replay graphs
    (``"cudagraphs"``) leaves the step eager (``None``). Warns when it departs from what was asked, since one
    ``compile_mode`` / ``compile_backend`` in ``train.json`` also reaches the validation sampler, which keeps its
    graphs."""
    graphless = without_cudagraphs(mode)
    eager = replays_cudagraphs(backend, graphless)
    if eager or graphless != mode:
        done = "runs eagerly" if eager else f"is compiled as {graphless!r}"
        warnings.warn(f"compile_backend={backend!r}, compile_mode={mode!r}: the training step {done}, without CUDA "
                      "graphs (its backward would read buffers that a later replay overwrote); the sampler keeps "
                      "them.", stacklevel=3)
    return None if eager else compile_network_calls(backend, forward=True, denoise=False, mode=graphless)
