"""Anchor condition of MedSegDiff-V2: Uncertain Spatial Attention (U-SA) and the plain-SA ablation.

Equations (method doc E2, E3)::

    f_anc   = max(f_c * k_Gauss, f_c)                 # relaxed anchor
    f_d'^0  = sigmoid(conv1x1(f_anc)) * f_d^0 + f_d^0   # spatial gate with residual

Design decisions the paper leaves open (method doc section 6, items 2-5):
the anchor ``f_c`` is the condition model's class-probability map; the Gaussian is depthwise and shared over
channels, ``kernel_size`` (default 5) per axis, normalised to sum 1, with a learnable centre ``mu`` (init 0) and
``log sigma`` (init log 1, sigma clamped to [0.3, 3]) per spatial axis; replicate padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import cached_for_inference, conv, tensor_key

__all__ = ["LearnableGaussianSmoothing", "SpatialAttentionGate", "UncertainSpatialAttention"]

_CONV_FN = {2: F.conv2d, 3: F.conv3d}


class LearnableGaussianSmoothing(nn.Module):
    """Depthwise Gaussian blur whose centre and width per axis are trained.

    Args:
        spatial_dims: 2 or 3.
        kernel_size: odd kernel size per axis.
        sigma_init: initial standard deviation (in voxels).
        sigma_range: clamp range of the standard deviation.

    Shapes: ``(B, C, *S) -> (B, C, *S)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        kernel_size: int = 5,
        sigma_init: float = 1.0,
        sigma_range: tuple[float, float] = (0.3, 3.0),
    ) -> None:
        super().__init__()
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 3, got {kernel_size}.")
        self.spatial_dims = spatial_dims
        self.kernel_size = kernel_size
        self.sigma_range = sigma_range
        self.mu = nn.Parameter(torch.zeros(spatial_dims))
        self.log_sigma = nn.Parameter(torch.full((spatial_dims,), math.log(sigma_init)))
        self.register_buffer("offsets", torch.arange(kernel_size, dtype=torch.float32) - kernel_size // 2, persistent=False)

    def kernel(self) -> torch.Tensor:
        """The normalised kernel, ``(k,) * spatial_dims``."""
        sigma = self.log_sigma.exp().clamp(*self.sigma_range)
        kernel = None
        for axis in range(self.spatial_dims):
            g = torch.exp(-0.5 * ((self.offsets - self.mu[axis]) / sigma[axis]) ** 2)
            kernel = g if kernel is None else kernel[..., None] * g
        return kernel / kernel.sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        k = self.kernel().to(x.dtype)
        weight = k.expand(channels, 1, *k.shape).contiguous()
        pad = (self.kernel_size // 2,) * (2 * self.spatial_dims)
        return _CONV_FN[self.spatial_dims](F.pad(x, pad, mode="replicate"), weight, groups=channels)


class SpatialAttentionGate(nn.Module):
    """Plain spatial attention (the "SA" ablation): ``f_d * sigmoid(conv1x1(anchor)) + f_d``.

    Args:
        spatial_dims: 2 or 3.
        anchor_channels: channels ``K`` of the anchor map ``(B, K, *S)``.

    ``forward(feature (B, C, *S), anchor (B, K, *S)) -> (B, C, *S)``; the one-channel gate broadcasts over C.
    """

    def __init__(self, spatial_dims: int, anchor_channels: int) -> None:
        super().__init__()
        self.gate = conv(spatial_dims, anchor_channels, 1, kernel_size=1)

    def relax(self, anchor: torch.Tensor) -> torch.Tensor:
        """Identity here; U-SA overrides it with Gaussian smoothing and max."""
        return anchor

    def forward(self, feature: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        if anchor.shape[2:] != feature.shape[2:]:
            raise ValueError(
                f"anchor spatial size {tuple(anchor.shape[2:])} differs from the diffusion feature "
                f"{tuple(feature.shape[2:])}."
            )
        # the gate depends on the image's anchor only: sampling computes it once for all steps
        key = (tuple(anchor.shape), anchor._version, feature.dtype, *tensor_key(*self.parameters()))
        attention = cached_for_inference(
            self, "_attention", key, lambda: torch.sigmoid(self.gate(self.relax(anchor).to(feature.dtype))), anchor)
        return feature * attention + feature


class UncertainSpatialAttention(SpatialAttentionGate):
    """U-SA: the anchor is relaxed by ``max(gauss(anchor), anchor)`` before the sigmoid gate.

    Args:
        spatial_dims: 2 or 3.
        anchor_channels: channels ``K`` of the anchor map.
        kernel_size: Gaussian kernel size per axis.
        sigma_init: initial Gaussian standard deviation.
    """

    def __init__(self, spatial_dims: int, anchor_channels: int, kernel_size: int = 5, sigma_init: float = 1.0) -> None:
        super().__init__(spatial_dims, anchor_channels)
        self.smooth = LearnableGaussianSmoothing(spatial_dims, kernel_size, sigma_init)

    def relax(self, anchor: torch.Tensor) -> torch.Tensor:
        return torch.maximum(self.smooth(anchor), anchor)
