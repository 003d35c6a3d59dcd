"""``DiffusionSegInferer``: the whole MedSegDiff-V2 sampling loop behind MONAI's ``Inferer`` interface.

``inferer(inputs, network)`` returns class probabilities, which is how MONAI evaluators, bundles and MONAI Label
call an inferer. Inputs larger than ``roi_size`` go through ``monai.inferers.sliding_window_inference`` with the
complete sampling loop (condition once, ensemble, fusion) run per window; smaller inputs are padded to the
network's divisor and cropped back.

Fast-path switches (issue #5), each off by default: ``amp`` (bf16 autocast, FFTs in fp32), ``channels_last`` and
``compile`` (see :mod:`medsegdiff_bundle.engine.fastpath`). The condition network runs once per image and the
ensemble is denoised as one batch in any case (:class:`~medsegdiff_bundle.diffusion.DiffusionSampler`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer, sliding_window_inference

from ..diffusion.sampler import DiffusionSampler
from ..utils import as_bool
from .ema import unwrap_model
from .fastpath import channels_last_format, check_compile_mode, compile_network_calls, to_channels_last

__all__ = ["DiffusionSegInferer"]


class DiffusionSegInferer(Inferer):
    """Sample segmentations with a trained MedSegDiff-V2.

    Args:
        sampler: ``"dpmpp"`` (default), ``"ddim"`` or ``"ddpm"`` (1000 steps).
        steps: sampler steps.
        ensemble: members per image, denoised as one batch.
        fusion: ``"mean"`` or ``"staple"`` (binary).
        uncertainty: ``"std"`` or ``"entropy"``.
        prediction_type: what the network was trained to predict (``"sample"`` or ``"epsilon"``).
        num_train_timesteps: ``T`` of training.
        schedule: training noise schedule name.
        seed: seed of the sampling noise (``None``: global RNG).
        roi_size: patch size for sliding-window inference; ``None`` runs on the whole input.
        sw_batch_size: windows per sampling batch.
        overlap: window overlap.
        mode: window blending, ``"gaussian"`` or ``"constant"``.
        return_uncertainty: append the uncertainty map as one extra last channel (``K + 1`` channels); split it
            off with :class:`medsegdiff_bundle.data.transforms.SplitUncertaintyd`. Off by default so that callers
            expecting plain probabilities (MONAI Label) get them.
        return_anchor: append the condition model's class probabilities (the anchor, ``K`` channels) after the
            fused probabilities and before the uncertainty, e.g. for validating the anchor beside the sampled result
            (split them off with :class:`medsegdiff_bundle.data.transforms.SplitTrailingChannelsd`).
        amp: run the network under bf16 autocast (on CUDA, or on a CPU; the bundle's configs turn it on where
            the device computes bf16 natively, :func:`~medsegdiff_bundle.engine.bf16_is_fast`); FFTs stay in fp32.
        channels_last: run in the channels-last layout (``torch.channels_last`` in 2D, ``channels_last_3d`` in 3D).
            The network's convolution weights are converted in place the first time it is seen (values and
            ``state_dict`` keys unchanged; later calls skip the conversion), the input is converted per call, and
            the output comes back in the default contiguous layout, as without the switch.
        compile: ``torch.compile`` the denoiser ``network.denoise``, the call every sampler step makes. It is
            compiled once, on the first call (per network architecture and input shape), and reused by every later
            call; the condition network (once per image) stays eager. The module itself is not modified
            (no ``_orig_mod.`` keys; it can still be saved, deep-copied and loaded). Expect the first call to take
            seconds to minutes longer.
        compile_backend: the ``torch.compile`` backend: ``"inductor"`` (default; on CPU it needs a C++ compiler),
            ``"cudagraphs"`` (the denoiser replayed as a CUDA graph without generated kernels: a short first call;
            CUDA only) or e.g. ``"aot_eager"`` (no code generation; what the CPU tests use).
        compile_mode: inductor's mode (:data:`~medsegdiff_bundle.engine.fastpath.COMPILE_MODES`): ``"default"``, or
            ``"reduce-overhead"`` to replay each denoiser call as a CUDA graph (CUDA; removes the kernel-launch gaps
            that dominate a small model's step; the output is copied out of the graph's buffers every step).
        round_x0: let each solver step continue from the most probable clean mask rather than the soft prediction
            (see :class:`~medsegdiff_bundle.diffusion.DiffusionSampler`); x0-prediction models only.
        anchor_weight: weight in ``[0, 1]`` of the condition model's segmentation blended into the fused ensemble
            (see :class:`~medsegdiff_bundle.diffusion.DiffusionSampler`); ``0`` (default) is the ensemble alone.
        mirror_axes: test-time mirroring (nnU-Net's mirroring, spread over the ensemble): spatial axes (0-based,
            e.g. ``[0, 1]`` in 2D) along which ensemble members see the image mirrored; each member's sample is
            mirrored back before the fusion (see :class:`~medsegdiff_bundle.diffusion.DiffusionSampler`). The
            denoiser's work is unchanged; the condition network runs once per distinct view (up to
            ``min(ensemble, 2 ** len(mirror_axes))``) instead of once. ``None`` / ``[]`` (default): off.

    ``__call__(inputs (B, C_in, *S), network) -> (B, K [+ K anchor] [+ 1 uncertainty], *S)``; the last call's
    uncertainty is also kept in ``self.last_uncertainty`` ``(B, 1, *S)``, and with ``return_anchor`` the anchor in
    ``self.last_anchor`` ``(B, K, *S)``.
    """

    def __init__(
        self,
        sampler: str = "dpmpp",
        steps: int = 20,
        ensemble: int = 5,
        fusion: str = "mean",
        uncertainty: str = "std",
        prediction_type: str = "sample",
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        seed: int | None = 0,
        roi_size: Sequence[int] | int | None = None,
        sw_batch_size: int = 1,
        overlap: float = 0.25,
        mode: str = "gaussian",
        return_uncertainty: bool = False,
        return_anchor: bool = False,
        amp: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        compile_backend: str | Callable = "inductor",
        compile_mode: str = "default",
        round_x0: bool = False,
        anchor_weight: float = 0.0,
        mirror_axes: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.sampler = DiffusionSampler(
            sampler, steps, ensemble, fusion, uncertainty, num_train_timesteps, schedule, prediction_type, seed,
            round_x0=as_bool(round_x0, "round_x0"), anchor_weight=anchor_weight, mirror_axes=mirror_axes,
        )
        self.roi_size = roi_size
        self.sw_batch_size = sw_batch_size
        self.overlap = overlap
        self.mode = mode
        self.amp = as_bool(amp, "amp")
        self.channels_last = as_bool(channels_last, "channels_last")
        self.compile = as_bool(compile, "compile")
        self.compile_backend = compile_backend
        self.compile_mode = check_compile_mode(compile_mode)
        # networks already converted to channels-last (weak: the inferer must not keep a network alive)
        self._channels_last_done: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
        self._compiled: Callable | None = None  # view factory, built on first use (compiling is lazy anyway)
        self.return_uncertainty = as_bool(return_uncertainty, "return_uncertainty")
        self.return_anchor = as_bool(return_anchor, "return_anchor")
        self.last_uncertainty: torch.Tensor | None = None
        self.last_anchor: torch.Tensor | None = None

    def _prepare(self, net: torch.nn.Module) -> Any:
        """The network as the sampler should see it: channels-last once, the compiled denoiser when asked for."""
        if self.channels_last and net not in self._channels_last_done:
            to_channels_last(net)
            self._channels_last_done.add(net)
        if not self.compile:
            return net
        if self._compiled is None:
            self._compiled = compile_network_calls(self.compile_backend, forward=False, denoise=True,
                                                   mode=self.compile_mode)
        return self._compiled(net)

    def _sample(self, network: Any, inputs: torch.Tensor) -> torch.Tensor:
        """Probabilities, the anchor if asked for, and uncertainty for a batch that fits the network:
        ``(B, K [+ K] + 1, *S)`` (one tensor, so that sliding windows blend them alike)."""
        divisor = network.divisor
        spatial = inputs.shape[2:]
        pad = []
        for size in reversed(spatial):
            extra = (-size) % divisor
            pad += [extra // 2, extra - extra // 2]
        x = F.pad(inputs, pad, mode="replicate") if any(pad) else inputs
        if isinstance(x, MetaTensor):
            # the network gets plain tensors: MetaTensor's __torch_function__ runs Python on every op of every step
            # (a tiny model's DPM-Solver++ step took 5.5 ms instead of 2.4 on CPU) and dynamo cannot trace it; the
            # output gets the input's meta back below
            x = x.as_tensor()
        if self.channels_last:
            x = x.contiguous(memory_format=channels_last_format(x.ndim - 2))
        with torch.autocast(device_type=inputs.device.type, dtype=torch.bfloat16, enabled=self.amp):
            result = self.sampler(network, x)
        parts = [result.probs] + ([result.anchor.to(result.probs.dtype)] if self.return_anchor else [])
        out = torch.cat(parts + [result.uncertainty], dim=1).float()
        if any(pad):
            crop = [slice(None), slice(None)]
            for dim, size in enumerate(spatial):
                start = pad[2 * (len(spatial) - 1 - dim)]
                crop.append(slice(start, start + size))
            out = out[tuple(crop)]
        if self.channels_last:  # callers get the layout they get without the switch
            out = out.contiguous()
        if isinstance(inputs, MetaTensor):  # and the type and meta, too
            out = MetaTensor(out)
            out.copy_meta_from(inputs)
        return out

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        net = unwrap_model(network)
        if not hasattr(net, "condition") or not hasattr(net, "denoise"):
            raise TypeError(f"DiffusionSegInferer needs a MedSegDiffV2-like network, got {type(net).__name__}.")
        was_training = net.training
        net.eval()
        try:
            sampled = self._prepare(net)
            roi = self.roi_size
            if roi is not None:
                roi = [roi] * (inputs.ndim - 2) if isinstance(roi, int) else list(roi)
            if roi is not None and any(s > r for s, r in zip(inputs.shape[2:], roi)):
                out = sliding_window_inference(
                    inputs, roi, self.sw_batch_size, lambda x: self._sample(sampled, x), self.overlap, self.mode
                )
            else:
                out = self._sample(sampled, inputs)
        finally:
            net.train(was_training)
        k = net.num_classes
        self.last_uncertainty = out[:, -1:]
        self.last_anchor = out[:, k:-1] if self.return_anchor else None
        return out if self.return_uncertainty else out[:, :-1]
