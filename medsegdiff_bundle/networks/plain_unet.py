"""nnU-Net-style plain UNet, the default condition model ``C`` of MedSegDiff-V2.

Built from MONAI's DynUNet blocks (``UnetBasicBlock``: conv-norm-LeakyReLU twice, ``UnetUpBlock``: transposed
convolution, concatenated skip, basic block; ``UnetOutBlock``: 1x1 head), with nnU-Net's He initialisation. The
official MedSegDiff-V2 code also conditions on an nnU-Net ``Generic_UNet``.

Why not the residual backbone of the diffusion UNet: trained alone as a segmenter on Kvasir-SEG (128², batch 8,
AdamW 1e-3, Dice + BCE, 300 iterations, 50 held-out training cases, 2-core CPU; ``benchmarks/condition_probe.py``),
this network at widths 16-32-64-128 reached Dice 0.61 at 0.16 s per iteration, the residual UNet at the same widths
0.43 at 0.27 s (0.47-0.50 with two more levels), a DynUNet at 32..320 0.65 at 0.53 s. The condition model's
segmentation is the anchor, and at short training budgets the diffusion model's output follows it (README, section
*Speed and quality*).

It exposes the same ``encode`` / ``middle`` / ``decode`` split as :class:`~.unet.ResidualUNet`, without a time
input: level ``i`` works at stride ``2**i`` with ``channels[i]`` features; the deepest level's block is the
bottleneck, so ``middle`` is the identity.

With instance norm (the default) it keeps the contiguous layout when the rest of the network runs channels-last
(:attr:`PlainUNet.keeps_contiguous_layout`): torch's instance norm is batch norm over a ``(1, B*C, *S)`` view, which a
channels-last tensor cannot give, so in that layout every norm copies its input and output, forward and backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetOutBlock, UnetUpBlock
from monai.networks.layers.factories import split_args
from torch import nn

from .blocks import unet_widths

__all__ = ["PlainUNet"]

#: nnU-Net's normalisation and activation (DynUNet's defaults)
INSTANCE_NORM = ("instance", {"affine": True})
LEAKY_RELU = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})


class PlainUNet(nn.Module):
    """A ``spatial_dims``-D plain UNet with ``len(channels)`` resolution levels (3x3 kernels, stride-2 down-sampling).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: channels of the 1x1 output head.
        channels: feature width per level, e.g. ``(32, 64, 128, 256)``; at least two levels.
        norm_name: MONAI normalisation name (default: instance norm with affine parameters, as nnU-Net).
        dropout: dropout inside the blocks (``None`` or 0: off).

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *S)``, every ``S`` a multiple of :attr:`divisor`.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (32, 64, 128, 256),
        norm_name: tuple | str = INSTANCE_NORM,
        dropout: float | None = None,
    ) -> None:
        super().__init__()
        channels = unet_widths(spatial_dims, channels)
        self.spatial_dims = spatial_dims
        self.channels = channels
        #: run contiguous whatever the layout around it: ``engine.to_channels_last`` keeps these weights contiguous and
        #: ``MedSegDiffV2.condition`` hands this network a contiguous image (measured in benchmarks/FINDINGS.md)
        self.keeps_contiguous_layout = str(split_args(norm_name)[0]).lower() == "instance"
        dropout = dropout or None  # MONAI's blocks add a Dropout layer for any non-None value

        def basic(cin: int, cout: int, stride: int) -> UnetBasicBlock:
            return UnetBasicBlock(spatial_dims, cin, cout, 3, stride, norm_name, LEAKY_RELU, dropout)

        widths_in = (in_channels,) + channels[:-1]
        self.enc_blocks = nn.ModuleList(
            basic(cin, cout, 1 if level == 0 else 2) for level, (cin, cout) in enumerate(zip(widths_in, channels))
        )
        self.ups = nn.ModuleList(
            UnetUpBlock(spatial_dims, channels[i + 1], channels[i], 3, 1, 2, norm_name, LEAKY_RELU, dropout)
            for i in range(len(channels) - 1)
        )
        self.head = UnetOutBlock(spatial_dims, channels[0], out_channels)
        self.apply(_he_init)

    @property
    def stem(self) -> nn.Module:
        """The first convolution, the one that sees the input (named like :class:`~.unet.ResidualUNet`'s)."""
        return self.enc_blocks[0].conv1.conv

    @property
    def divisor(self) -> int:
        """Every spatial size of the input must be a multiple of this."""
        return 2 ** (len(self.channels) - 1)

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``x (B, in_channels, *S)`` -> skips for levels ``0..L-2`` and the bottleneck ``(B, C_L, *S/2**(L-1))``."""
        skips: list[torch.Tensor] = []
        h = x
        for level, block in enumerate(self.enc_blocks):
            h = block(h)
            if level < len(self.ups):
                skips.append(h)
        return skips, h

    def middle(self, h: torch.Tensor) -> torch.Tensor:
        """Identity: the deepest encoder block is this network's bottleneck."""
        return h

    def decode(self, h: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Decoder and head: bottleneck ``(B, C_L, *s)`` and skips -> logits ``(B, out_channels, *S)``."""
        for level in reversed(range(len(self.ups))):
            h = self.ups[level](h, skips[level])
        return self.head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips, h = self.encode(x)
        return self.decode(self.middle(h), skips)


def _he_init(module: nn.Module) -> None:
    """nnU-Net's ``InitWeights_He(1e-2)``: He-normal convolution weights for LeakyReLU(0.01), zero biases."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=0.01)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
