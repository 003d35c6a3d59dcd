"""Semantic condition of MedSegDiff-V2: the Spectrum-Space Transformer (SS-Former) and its Neural Band-pass
Filter (NBP-Filter).

The paper's exact attention and NBP equations were not retrievable; this follows the reconstruction in the
method doc (section 3.1, ``ss_attn_mode="token"``):

* ``SpectralCrossAttention``: queries and keys are projected, taken to the spectrum with ``rfftn`` over the
  spatial axes (float32, ``norm="ortho"``), multiplied by the NBP mask ``H(omega, tau)``, brought back with
  ``irfftn`` and used in multi-head scaled-dot-product attention over the bottleneck tokens.
* ``NeuralBandPassFilter`` (E5): Fourier features of the normalised frequency grid pass through ``R`` blocks
  ``ReLU((1 + s_r(tau)) * LN(W_r h) + b_r(tau))`` and ``H = 2 * sigmoid(W_out h_R)``, one value per channel and
  frequency. ``W_out`` is zero-initialised, so ``H == 1`` (identity filter) at initialisation.

Deviation from the method doc, on purpose: the time projections ``s_r, b_r`` keep PyTorch's default init
(the doc zero-initialises them too). With both zero, the filter could not become time dependent until a
second optimiser step had moved ``W_out``; identity at init only needs ``W_out = 0``. Likewise the attention
output projection keeps its default init so that gradients reach the filter from the first step.

Shapes: noise stream ``e`` and semantic stream ``c`` are ``(B, C, *s)`` at the bottleneck, the time embedding
``tau`` is ``(B, D_t)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import cached_for_inference, channels_last_layout, tensor_key

__all__ = ["frequency_grid", "NeuralBandPassFilter", "SpectralCrossAttention", "SSFormerBlock", "SSFormer"]


def _layout_like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` in ``ref``'s memory layout: channels-last if ``ref`` is (and is not also plain contiguous),
    else contiguous.

    Tokens ``(B, N, C)`` reshaped back to ``(B, C, *s)`` are a view with channels-last-like strides whatever the
    input's layout, and with a batch of one its batch stride is arbitrary. A copy with fresh strides keeps the
    decoder in the layout the caller chose, and keeps AOT tracing honest: it had traced that view as channels-last
    contiguous, and GroupNorm's kernel then refused the real strides (``.contiguous()`` would not copy: size-1 axes
    are ignored by the contiguity check).
    """
    return x.clone(memory_format=channels_last_layout(ref) or torch.contiguous_format)


def frequency_grid(spatial_shape: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
    """Normalised ``rfftn`` frequency coordinates, ``(*F, spatial_dims)``.

    Full axes lie in ``[-1, 1)``, the last (half) axis in ``[0, 1]``; ``F`` is the rfft grid of ``spatial_shape``.
    """
    axes = [torch.fft.fftfreq(n, device=device) * 2 for n in spatial_shape[:-1]]
    axes.append(torch.fft.rfftfreq(spatial_shape[-1], device=device) * 2)
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


class NeuralBandPassFilter(nn.Module):
    """Timestep-adaptive band-pass mask over the spectrum (method doc E5).

    Args:
        channels: channels ``C`` of the filtered features (one mask value per channel and frequency).
        temb_channels: width ``D_t`` of the time embedding.
        spatial_dims: 2 or 3.
        hidden: width of the per-frequency MLP.
        num_blocks: ``R``, the number of time-modulated blocks.
        num_bands: ``L``, Fourier-feature bands of the frequency coordinates.

    ``forward(tau (B, D_t), spatial_shape) -> H (B, C, *F)`` with values in ``(0, 2)``.
    """

    def __init__(
        self,
        channels: int,
        temb_channels: int,
        spatial_dims: int,
        hidden: int = 64,
        num_blocks: int = 3,
        num_bands: int = 4,
    ) -> None:
        super().__init__()
        self.num_bands = num_bands
        self.w_in = nn.Linear(spatial_dims * (1 + 2 * num_bands), hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(num_blocks))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(num_blocks))
        self.time_mod = nn.ModuleList(nn.Linear(temb_channels, 2 * hidden) for _ in range(num_blocks))
        self.w_out = nn.Linear(hidden, channels)
        nn.init.zeros_(self.w_out.weight)
        nn.init.zeros_(self.w_out.bias)

    def fourier_features(self, grid: torch.Tensor) -> torch.Tensor:
        """``(*F, dims) -> (*F, dims * (1 + 2L))``: the coordinates plus sin/cos at ``2**l * pi``."""
        scales = (2.0 ** torch.arange(self.num_bands, device=grid.device, dtype=grid.dtype)) * math.pi
        angles = (grid[..., None] * scales).flatten(-2)
        return torch.cat([grid, angles.sin(), angles.cos()], dim=-1)

    def frequency_features(self, spatial_shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The input layer on the frequency grid, ``(1, Nf, hidden)``: the same at every timestep, so sampling keeps
        it between steps (:func:`cached_for_inference`)."""
        def make() -> torch.Tensor:
            grid = frequency_grid(spatial_shape, device=device)
            return self.w_in(self.fourier_features(grid).reshape(-1, self.w_in.in_features)).unsqueeze(0)

        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        key = (spatial_shape, device, dtype, *tensor_key(self.w_in.weight, self.w_in.bias))
        return cached_for_inference(self, "_frequency_features", key, make)

    def forward(self, tau: torch.Tensor, spatial_shape: tuple[int, ...]) -> torch.Tensor:
        spatial_shape = tuple(spatial_shape)
        freq_shape = (*spatial_shape[:-1], spatial_shape[-1] // 2 + 1)  # the rfftn grid
        h = self.frequency_features(spatial_shape, tau.device)  # (1, Nf, hidden)
        for layer, norm, mod in zip(self.layers, self.norms, self.time_mod):
            scale, shift = mod(F.silu(tau.float())).unsqueeze(1).chunk(2, dim=-1)
            h = F.relu((1 + scale) * norm(layer(h)) + shift)
        mask = 2 * torch.sigmoid(self.w_out(h))  # (B, Nf, C)
        return mask.transpose(1, 2).reshape(tau.shape[0], -1, *freq_shape)


def _band_pass(tokens: torch.Tensor, mask: torch.Tensor, spatial_shape: tuple[int, ...]) -> torch.Tensor:
    """Filter token features in the spectrum: ``(B, N, C)`` and ``H (B, C, *F)`` -> ``(B, N, C)``.

    The FFT runs in float32 whatever the autocast dtype (bf16/fp16 FFTs are inaccurate or unsupported).
    """
    b, n, c = tokens.shape
    dims = tuple(range(2, 2 + len(spatial_shape)))
    with torch.autocast(device_type=tokens.device.type, enabled=False):
        x = tokens.float().transpose(1, 2).reshape(b, c, *spatial_shape)
        spectrum = torch.fft.rfftn(x, dim=dims, norm="ortho") * mask.float()
        x = torch.fft.irfftn(spectrum, s=spatial_shape, dim=dims, norm="ortho")
    # contiguous so scaled_dot_product_attention can pick its fused (flash / memory-efficient) kernels
    return x.reshape(b, c, n).transpose(1, 2).contiguous().to(tokens.dtype)


class SpectralCrossAttention(nn.Module):
    """Multi-head cross-attention whose queries and keys are band-passed in spectrum space.

    Args:
        channels: token width ``C``.
        num_heads: attention heads; ``C`` must be divisible by it.
        nbp: the NBP-Filter for this unit, or ``None`` for the "without NBP-Filter" ablation (``H == 1``).

    ``forward(q_src (B, N, C), kv_src (B, N, C), tau (B, D_t), spatial_shape) -> (B, N, C)``.
    """

    def __init__(self, channels: int, num_heads: int, nbp: NeuralBandPassFilter | None) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"SS-Former width {channels} is not divisible by num_heads={num_heads}.")
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(channels)
        self.norm_kv = nn.LayerNorm(channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)
        self.nbp = nbp

    def forward(
        self, q_src: torch.Tensor, kv_src: torch.Tensor, tau: torch.Tensor, spatial_shape: tuple[int, ...]
    ) -> torch.Tensor:
        q = self.to_q(self.norm_q(q_src))
        kv = self.norm_kv(kv_src)
        k, v = self.to_k(kv), self.to_v(kv)
        if self.nbp is not None:
            mask = self.nbp(tau, spatial_shape)
            q, k = _band_pass(q, mask, spatial_shape), _band_pass(k, mask, spatial_shape)
        b, n, c = q.shape
        q, k, v = (t.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, c))


class _FeedForward(nn.Sequential):
    """Pre-norm MLP ``LN -> Linear(C, rC) -> GELU -> Linear(rC, C)`` on tokens ``(B, N, C)``."""

    def __init__(self, channels: int, ratio: int = 4) -> None:
        super().__init__(
            nn.LayerNorm(channels), nn.Linear(channels, ratio * channels), nn.GELU(), nn.Linear(ratio * channels, channels)
        )


class SSFormerBlock(nn.Module):
    """One SS-Former block: U1 (noise -> semantic) then U2 (semantic -> noise), each attention + FFN, residual.

    ``c <- c + Attn(c, e); c <- c + FFN(c); e <- e + Attn(e, c); e <- e + FFN(e)``.
    """

    def __init__(
        self,
        channels: int,
        temb_channels: int,
        spatial_dims: int,
        num_heads: int,
        use_filter: bool = True,
        nbp_hidden: int = 64,
        nbp_blocks: int = 3,
        nbp_bands: int = 4,
    ) -> None:
        super().__init__()

        def unit() -> SpectralCrossAttention:
            nbp = (
                NeuralBandPassFilter(channels, temb_channels, spatial_dims, nbp_hidden, nbp_blocks, nbp_bands)
                if use_filter
                else None
            )
            return SpectralCrossAttention(channels, num_heads, nbp)

        self.attn_noise_to_sem = unit()
        self.ffn_sem = _FeedForward(channels)
        self.attn_sem_to_noise = unit()
        self.ffn_noise = _FeedForward(channels)

    def forward(
        self, e: torch.Tensor, c: torch.Tensor, tau: torch.Tensor, spatial_shape: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c = c + self.attn_noise_to_sem(c, e, tau, spatial_shape)
        c = c + self.ffn_sem(c)
        e = e + self.attn_sem_to_noise(e, c, tau, spatial_shape)
        e = e + self.ffn_noise(e)
        return e, c


class SSFormer(nn.Module):
    """Stack of ``num_blocks`` SS-Former blocks at the bottleneck.

    Args:
        spatial_dims: 2 or 3.
        channels: bottleneck width ``C`` (shared by the noise and the semantic stream).
        temb_channels: time-embedding width ``D_t``.
        num_blocks: number of blocks ``N``.
        num_heads: attention heads; ``None`` picks ``max(1, min(4, C // 32))`` (head width >= 32 when possible).
        use_filter: ``False`` is the "SS-Former without NBP-Filter" ablation.
        nbp_hidden, nbp_blocks, nbp_bands: NBP-Filter size (see ``NeuralBandPassFilter``).

    ``forward(e (B, C, *s), c (B, C, *s), tau (B, D_t)) -> e' (B, C, *s)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        temb_channels: int,
        num_blocks: int = 2,
        num_heads: int | None = None,
        use_filter: bool = True,
        nbp_hidden: int = 64,
        nbp_blocks: int = 3,
        nbp_bands: int = 4,
    ) -> None:
        super().__init__()
        heads = num_heads if num_heads is not None else max(1, min(4, channels // 32))
        self.blocks = nn.ModuleList(
            SSFormerBlock(channels, temb_channels, spatial_dims, heads, use_filter, nbp_hidden, nbp_blocks, nbp_bands)
            for _ in range(num_blocks)
        )

    def forward(self, e: torch.Tensor, c: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        if e.shape != c.shape:
            raise ValueError(f"noise embedding {tuple(e.shape)} and semantic embedding {tuple(c.shape)} differ.")
        spatial_shape = tuple(e.shape[2:])
        b, ch = e.shape[:2]
        e_tok = e.flatten(2).transpose(1, 2)
        c_tok = c.flatten(2).transpose(1, 2)
        for block in self.blocks:
            e_tok, c_tok = block(e_tok, c_tok, tau, spatial_shape)
        return _layout_like(e_tok.transpose(1, 2).reshape(b, ch, *spatial_shape), e)
