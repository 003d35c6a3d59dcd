"""Residual UNet backbone used twice by MedSegDiff-V2: as the condition model ``C`` (no time input) and as
the diffusion model ``D`` (time-modulated blocks).

The backbone exposes ``encode`` and ``decode`` separately so that MedSegDiff-V2 can put the U-SA anchor
after the first encoder stage and the SS-Former between the encoder and the middle block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .blocks import Downsample, ResBlock, Upsample, conv, group_norm, unet_widths

__all__ = ["ResidualUNet"]


class ResidualUNet(nn.Module):
    """A ``spatial_dims``-D residual UNet with ``len(channels)`` resolution levels.

    Level ``i`` works at stride ``2**i`` with ``channels[i]`` features; the deepest level is the bottleneck.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: channels of the output head.
        channels: feature width per level, e.g. ``(32, 64, 128, 256)``; at least two levels.
        num_res_blocks: residual blocks per level in the encoder and in the decoder.
        temb_channels: time-embedding width for every block, or ``None`` (no time input).
        norm_num_groups: GroupNorm groups.
        dropout: dropout inside residual blocks.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (32, 64, 128, 256),
        num_res_blocks: int = 1,
        temb_channels: int | None = None,
        norm_num_groups: int = 8,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        channels = unet_widths(spatial_dims, channels)
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}.")
        self.spatial_dims = spatial_dims
        self.channels = channels

        def block(cin: int, cout: int) -> ResBlock:
            return ResBlock(spatial_dims, cin, cout, temb_channels, norm_num_groups, dropout)

        self.stem = conv(spatial_dims, in_channels, channels[0])
        self.enc_blocks = nn.ModuleList(
            nn.ModuleList(block(ch, ch) for j in range(num_res_blocks)) for ch in channels
        )
        self.downs = nn.ModuleList(Downsample(spatial_dims, channels[i], channels[i + 1]) for i in range(len(channels) - 1))
        self.mid = nn.ModuleList([block(channels[-1], channels[-1]), block(channels[-1], channels[-1])])
        self.ups = nn.ModuleList(Upsample(spatial_dims, channels[i + 1], channels[i]) for i in range(len(channels) - 1))
        self.dec_blocks = nn.ModuleList(
            nn.ModuleList(block(2 * ch if j == 0 else ch, ch) for j in range(num_res_blocks)) for ch in channels[:-1]
        )
        self.head = nn.Sequential(group_norm(channels[0], norm_num_groups), nn.SiLU(), conv(spatial_dims, channels[0], out_channels))

    @property
    def divisor(self) -> int:
        """Every spatial size of the input must be a multiple of this."""
        return 2 ** (len(self.channels) - 1)

    def encode(
        self,
        x: torch.Tensor,
        temb: torch.Tensor | None = None,
        stage0_hook: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Run the encoder.

        Args:
            x: ``(B, in_channels, *S)``.
            temb: ``(B, temb_channels)`` or ``None``.
            stage0_hook: applied to the full-resolution stage-0 feature ``(B, channels[0], *S)`` before it is
                used as skip and downsampled (MedSegDiff-V2 puts the U-SA anchor here).

        Returns:
            skips for levels ``0..L-2`` and the deepest encoder feature ``(B, channels[-1], *S/2**(L-1))``.
        """
        h = self.stem(x)
        skips: list[torch.Tensor] = []
        for level, blocks in enumerate(self.enc_blocks):
            for blk in blocks:
                h = blk(h, temb)
            if level == 0 and stage0_hook is not None:
                h = stage0_hook(h)
            if level < len(self.downs):
                skips.append(h)
                h = self.downs[level](h)
        return skips, h

    def middle(self, h: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        """Bottleneck blocks: ``(B, C_L, *s) -> (B, C_L, *s)``."""
        for blk in self.mid:
            h = blk(h, temb)
        return h

    def decode(
        self, h: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Decoder and head: bottleneck ``(B, C_L, *s)`` and skips -> ``(B, out_channels, *S)``."""
        for level in reversed(range(len(self.ups))):
            h = self.ups[level](h)
            h = torch.cat([h, skips[level]], dim=1)
            for blk in self.dec_blocks[level]:
                h = blk(h, temb)
        return self.head(h)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        skips, h = self.encode(x, temb)
        return self.decode(self.middle(h, temb), skips, temb)

