"""Residual building blocks shared by the condition UNet and the diffusion UNet.

All blocks are dimension-agnostic: ``spatial_dims`` picks Conv2d/Conv3d, and feature maps are
``(B, C, *spatial)`` with ``len(spatial) == spatial_dims``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn

__all__ = [
    "channels_last_layout", "GroupNorm", "group_norm", "conv", "unet_widths", "ResBlock", "Downsample", "Upsample",
    "TimestepEmbedding", "cached_for_inference", "tensor_key",
]


def tensor_key(*tensors: torch.Tensor | None) -> tuple:
    """What identifies the current values of ``tensors`` (parameters): storage, in-place version, dtype, device. An
    optimiser step or ``load_state_dict`` bumps the version, ``module.to()`` changes the storage."""
    return tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)


# what cached_for_inference keeps, per module, outside the module: its state (deepcopy, pickle, torch.save) stays
# free of cached tensors and of the weak references that could not be pickled
_KEPT: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple]] = weakref.WeakKeyDictionary()


def cached_for_inference(owner: nn.Module, slot: str, key: tuple, make: Callable[[], Any],
                         source: torch.Tensor | None = None) -> Any:
    """``make()``, kept for ``owner`` under ``slot`` and returned again while ``key`` is unchanged (and, with
    ``source``, while it is the very same tensor object: a freed tensor's address and ``id`` can be reused by the
    next image's).

    For values that stay the same from one sampler step to the next (a parameter cast to bf16, features of a fixed
    frequency grid, the attention map of the image's anchor): in the eager sampling loop every operator is host
    time that a GPU step waits for. Only when no gradient is recorded (autograd needs the operations in its graph)
    and nothing is being compiled or traced (a compiled graph fuses them anyway, and a cache read would enter a
    graph or a TorchScript trace as a constant, frozen to one image, one size and the weights of the moment).
    """
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return make()
    slots = _KEPT.setdefault(owner, {})
    cached = slots.get(slot)
    if cached is None or cached[0] != key or (source is not None and cached[2]() is not source):
        cached = slots[slot] = (key, make(), None if source is None else weakref.ref(source))
    return cached[1]


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that keeps a bf16/fp16 input's dtype under autocast.

    CUDA autocast runs ``group_norm`` in fp32: it casts the bf16 activation up, returns fp32, the following SiLU and
    scale-shift run in fp32 and the next convolution casts back, and autograd keeps the fp32 copies for backward.
    On an H200 that was 35 % (norms) + 16 % (casts) of the fast path's kernel time, and training memory ran ~35 %
    above the CPU-measured memory model (CPU autocast keeps group_norm in bf16). The kernels accumulate a
    low-precision input's statistics in fp32 on both devices, so this runs them in the input's dtype: same
    statistics, only the output is rounded to bf16 -- as the next convolution would round it anyway. Parameters,
    ``state_dict`` keys and fp32 behaviour are those of ``nn.GroupNorm``.

    On the CPU, a low-precision channels-last input that autograd tracks (training) is normalised in the contiguous
    layout and handed back channels-last: torch's CPU backward of ``group_norm`` for that layout is 5-35x slower
    than for the contiguous one (bf16, 2 cores, torch 2.13: 21 ms against 1 ms at ``(8, 16, 128, 128)``), and the
    two layout copies cost less than the difference (about 10 % of a bf16 training step of the small model). The
    forward kernels are fast in both layouts, so inference keeps channels-last throughout.

    ``(B, C, *S) -> (B, C, *S)``, in the input's dtype and memory layout.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                weight, bias = cached_for_inference(
                    self, "_low_precision_affine", (x.dtype, *tensor_key(self.weight, self.bias)),
                    lambda: tuple(None if p is None else p.to(x.dtype) for p in (self.weight, self.bias)))
                layout = channels_last_layout(x) if x.device.type == "cpu" and x.requires_grad else None
                if layout is None:
                    return F.group_norm(x, self.num_groups, weight, bias, self.eps)
                y = F.group_norm(x.contiguous(), self.num_groups, weight, bias, self.eps)
                return y.contiguous(memory_format=layout)
        return super().forward(x)


def channels_last_layout(x: torch.Tensor) -> torch.memory_format | None:
    """``torch.channels_last`` / ``channels_last_3d`` when ``x`` is laid out so (and not also plain contiguous, as a
    tensor with one channel or one voxel is), else ``None``."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.ndim)
    if fmt is None or x.is_contiguous() or not x.is_contiguous(memory_format=fmt):
        return None
    return fmt


def group_norm(channels: int, num_groups: int = 8) -> GroupNorm:
    """:class:`GroupNorm` whose group count divides ``channels`` (tiny test widths stay valid)."""
    return GroupNorm(math.gcd(num_groups, channels), channels, eps=1e-5)


def unet_widths(spatial_dims: int, channels: Sequence[int]) -> tuple[int, ...]:
    """Check a UNet's ``spatial_dims`` (2 or 3) and per-level widths (at least two, positive); returns the widths."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    widths = tuple(int(c) for c in channels)
    if len(widths) < 2 or min(widths) < 1:
        raise ValueError(f"channels needs at least two positive widths, got {widths}.")
    return widths


def conv(spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> nn.Module:
    """Same-padded ``spatial_dims``-D convolution."""
    return Conv[Conv.CONV, spatial_dims](
        in_channels, out_channels, kernel_size=kernel_size, stride=stride, padding=kernel_size // 2
    )


class ResBlock(nn.Module):
    """Pre-activation residual block, optionally modulated by a time embedding (AdaGN scale-shift).

    ``x -> GN -> SiLU -> conv -> GN -> [*(1+scale)+shift] -> SiLU -> dropout -> conv (+ skip)``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the input ``(B, in_channels, *S)``.
        out_channels: channels of the output ``(B, out_channels, *S)``.
        temb_channels: width of the time embedding ``(B, temb_channels)``; ``None`` for a block without one
            (the condition UNet has no timestep input).
        norm_num_groups: GroupNorm groups (reduced to a divisor of the width when needed).
        dropout: dropout before the second convolution.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None = None,
        norm_num_groups: int = 8,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_num_groups)
        self.conv1 = conv(spatial_dims, in_channels, out_channels)
        self.norm2 = group_norm(out_channels, norm_num_groups)
        self.time_proj = nn.Linear(temb_channels, 2 * out_channels) if temb_channels else None
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv(spatial_dims, out_channels, out_channels)
        self.skip = (
            nn.Identity() if in_channels == out_channels else conv(spatial_dims, in_channels, out_channels, kernel_size=1)
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.time_proj is not None:
            if temb is None:
                raise ValueError("this ResBlock was built with a time embedding; pass `temb`.")
            scale, shift = self.time_proj(F.silu(temb)).chunk(2, dim=1)
            shape = scale.shape + (1,) * (h.ndim - 2)
            h = h * (1 + scale.view(shape)) + shift.view(shape)
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.skip(x)


class Downsample(nn.Module):
    """Strided 3x3(x3) convolution halving every spatial size: ``(B, C_in, *S) -> (B, C_out, *S/2)``."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = conv(spatial_dims, in_channels, out_channels, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3(x3) convolution: ``(B, C_in, *S) -> (B, C_out, *2S)``."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = conv(spatial_dims, in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedding(nn.Module):
    """Sinusoidal timestep embedding (MONAI's ``get_timestep_embedding``) followed by a 2-layer MLP.

    Args:
        base_channels: width of the sinusoidal features.
        embed_channels: output width ``D_t``; ``timesteps (B,) -> (B, D_t)``.
    """

    def __init__(self, base_channels: int, embed_channels: int) -> None:
        super().__init__()
        self.base_channels = base_channels
        self.mlp = nn.Sequential(
            nn.Linear(base_channels, embed_channels), nn.SiLU(), nn.Linear(embed_channels, embed_channels)
        )

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        emb = get_timestep_embedding(timesteps, self.base_channels)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))
