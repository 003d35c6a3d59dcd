"""MedSegDiff-V2 (Wu et al., AAAI 2024) for ``spatial_dims`` 2 and 3.

::

    image ─► condition UNet C ─► anchor logits ─► softmax/sigmoid = f_c (anchor) ──┐
                     └─► bottleneck c0 (semantic) ─────────────────────────────┐    │
    x_t ─► D.stem/stage0 ─► U-SA(f_d^0, f_c) ─► D.encoder ─► e0 ─► SS-Former(e0, c0, tau) ─► D.mid/decoder ─► eps

``condition(image)`` runs C once and returns :class:`ConditionFeatures`, which samplers reuse for every step
and every ensemble member; ``denoise(x_t, t, cond)`` runs D. ``forward(x_t, image, t)`` does both for training.

Mask encoding: ``num_classes`` counts the background. Binary tasks (``num_classes == 2``) diffuse one
foreground channel; multi-class tasks diffuse ``num_classes`` one-hot channels (background included); values
are scaled to ``[-1, 1]`` (see :mod:`medsegdiff_bundle.diffusion.labels`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .anchor import SpatialAttentionGate, UncertainSpatialAttention
from .blocks import TimestepEmbedding, channels_last_layout, conv
from .plain_unet import PlainUNet
from .ssformer import SSFormer
from .unet import ResidualUNet

__all__ = ["ConditionFeatures", "MedSegDiffV2", "ANCHOR_MODES", "SEMANTIC_MODES", "CONDITION_BACKBONES"]

ANCHOR_MODES = ("usa", "sa", "none")
SEMANTIC_MODES = ("ssformer", "ssformer_nofilter", "none")
CONDITION_BACKBONES = ("plain", "residual")


@dataclass
class ConditionFeatures:
    """What the condition model hands to the diffusion model.

    Attributes:
        logits: condition-model segmentation logits ``(B, M, *S)`` (``M`` = mask channels).
        anchor: the anchor map ``f_c`` (class probabilities of ``logits``), ``(B, M, *S)``.
        semantic: bottleneck embedding ``c0`` at the diffusion UNet's width, ``(B, C_L, *S/2**(L-1))``.
    """

    logits: torch.Tensor
    anchor: torch.Tensor
    semantic: torch.Tensor

    def take(self, index: torch.Tensor) -> ConditionFeatures:
        """The samples at ``index`` (a 1D long tensor on the features' device) along the batch, in that order, e.g.
        each sample repeated for the members of an ensemble in one batch (``b0,b0,..,b1,b1,..``)."""
        return ConditionFeatures(*(t.index_select(0, index) for t in (self.logits, self.anchor, self.semantic)))


class MedSegDiffV2(nn.Module):
    """MedSegDiff-V2: diffusion UNet on the noisy mask, conditioned on the image by a condition UNet through the
    U-SA anchor and the SS-Former semantic path.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels (e.g. 3 for RGB, 4 for BraTS MRI).
        num_classes: classes including background (2 for binary).
        channels: widths per level of the diffusion UNet (and of the condition UNet unless ``condition_channels``).
        num_res_blocks: residual blocks per level of the residual UNets (D; C too with ``condition_backbone="residual"``;
            the plain C has two convolutions per level).
        anchor: ``"usa"`` (default), ``"sa"`` (plain spatial attention) or ``"none"``.
        semantic: ``"ssformer"`` (default), ``"ssformer_nofilter"`` (H == 1) or ``"none"``.
        ss_blocks: SS-Former depth ``N``.
        ss_heads: SS-Former heads (``None``: automatic, head width >= 32 when possible).
        nbp_hidden, nbp_blocks, nbp_bands: NBP-Filter size.
        gaussian_kernel_size: U-SA Gaussian kernel size per axis.
        norm_num_groups: GroupNorm groups of the residual UNets (the plain C uses instance norm).
        dropout: dropout in the blocks of both UNets.
        condition_channels: widths per level of the condition UNet, as many levels as ``channels``; ``None``
            (default) uses ``channels``. The condition UNet runs once per image at inference while the diffusion UNet
            runs for every step and member, so a wide condition UNet with a light diffusion UNet buys accuracy of
            the anchor at little sampling cost (the official code also conditions on a separate nnU-Net). When its
            bottleneck width differs, a 1x1 convolution maps ``c0`` to the diffusion width for the SS-Former.
        condition_backbone: ``"plain"`` (default): an nnU-Net-style plain UNet (:class:`PlainUNet`, instance norm,
            LeakyReLU), which learns to segment much faster than the residual backbone; ``"residual"``: the
            diffusion UNet's residual backbone without time input (GroupNorm, SiLU; the bundle's default before
            0.4.0, whose checkpoints need it).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        num_classes: int = 2,
        channels: Sequence[int] = (32, 64, 128, 256),
        num_res_blocks: int = 1,
        anchor: str = "usa",
        semantic: str = "ssformer",
        ss_blocks: int = 2,
        ss_heads: int | None = None,
        nbp_hidden: int = 64,
        nbp_blocks: int = 3,
        nbp_bands: int = 4,
        gaussian_kernel_size: int = 5,
        norm_num_groups: int = 8,
        dropout: float = 0.0,
        condition_channels: Sequence[int] | None = None,
        condition_backbone: str = "plain",
    ) -> None:
        super().__init__()
        if anchor not in ANCHOR_MODES:
            raise ValueError(f"anchor must be one of {ANCHOR_MODES}, got {anchor!r}.")
        if semantic not in SEMANTIC_MODES:
            raise ValueError(f"semantic must be one of {SEMANTIC_MODES}, got {semantic!r}.")
        if condition_backbone not in CONDITION_BACKBONES:
            raise ValueError(f"condition_backbone must be one of {CONDITION_BACKBONES}, got {condition_backbone!r}.")
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}.")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.mask_channels = 1 if num_classes == 2 else num_classes
        self.anchor_mode = anchor
        self.semantic_mode = semantic
        channels = tuple(channels)
        temb_channels = 4 * channels[0]

        cond_channels = tuple(condition_channels) if condition_channels is not None else channels
        if len(cond_channels) != len(channels):
            raise ValueError(
                f"condition_channels {cond_channels} must have as many levels as channels {channels}, so that the "
                "two bottlenecks meet at the same resolution."
            )
        self.condition_backbone = condition_backbone
        self.condition_unet: PlainUNet | ResidualUNet
        if condition_backbone == "plain":
            self.condition_unet = PlainUNet(
                spatial_dims, in_channels, self.mask_channels, cond_channels, dropout=dropout
            )
        else:
            self.condition_unet = ResidualUNet(
                spatial_dims, in_channels, self.mask_channels, cond_channels, num_res_blocks, None, norm_num_groups,
                dropout,
            )
        self.time_embed = TimestepEmbedding(channels[0], temb_channels)
        self.diffusion_unet = ResidualUNet(
            spatial_dims, self.mask_channels, self.mask_channels, channels, num_res_blocks, temb_channels,
            norm_num_groups, dropout,
        )
        self.anchor: SpatialAttentionGate | None = None
        if anchor == "usa":
            self.anchor = UncertainSpatialAttention(spatial_dims, self.mask_channels, gaussian_kernel_size)
        elif anchor == "sa":
            self.anchor = SpatialAttentionGate(spatial_dims, self.mask_channels)
        self.ssformer: SSFormer | None = None
        self.semantic_proj: nn.Module | None = None
        if semantic != "none" and cond_channels[-1] != channels[-1]:
            self.semantic_proj = conv(spatial_dims, cond_channels[-1], channels[-1], kernel_size=1)
        if semantic != "none":
            self.ssformer = SSFormer(
                spatial_dims, channels[-1], temb_channels, ss_blocks, ss_heads, semantic == "ssformer",
                nbp_hidden, nbp_blocks, nbp_bands,
            )

    @property
    def divisor(self) -> int:
        """Every spatial size of the input must be a multiple of this."""
        return self.diffusion_unet.divisor

    def anchor_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Condition-model probabilities: sigmoid for one mask channel, softmax over classes otherwise."""
        return torch.sigmoid(logits) if self.mask_channels == 1 else torch.softmax(logits, dim=1)

    def _check_spatial(self, name: str, x: torch.Tensor, channels: int) -> None:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"{name} must be (B, C, {', '.join('HWD'[: self.spatial_dims])}) for spatial_dims={self.spatial_dims}, "
                f"got shape {tuple(x.shape)}."
            )
        if x.shape[1] != channels:
            raise ValueError(f"{name} has {x.shape[1]} channels, the network expects {channels}.")
        bad = [s for s in x.shape[2:] if s % self.divisor]
        if bad:
            raise ValueError(
                f"{name} spatial size {tuple(x.shape[2:])} is not divisible by {self.divisor} "
                f"(2**(levels-1) for {len(self.diffusion_unet.channels)} levels); pad or resize the input."
            )

    def condition(self, image: torch.Tensor) -> ConditionFeatures:
        """Run the condition UNet once: ``image (B, in_channels, *S) -> ConditionFeatures``."""
        self._check_spatial("image", image, self.in_channels)
        net = self.condition_unet
        layout = channels_last_layout(image)
        if layout is not None and getattr(net, "keeps_contiguous_layout", False):
            image = image.contiguous()
        skips, h = net.encode(image)
        semantic = net.middle(h)
        logits = net.decode(semantic, skips)
        if layout is not None:  # the denoiser's layout, for the anchor gate and the SS-Former
            logits, semantic = logits.contiguous(memory_format=layout), semantic.contiguous(memory_format=layout)
        if self.semantic_proj is not None:
            semantic = self.semantic_proj(semantic)
        return ConditionFeatures(logits=logits, anchor=self.anchor_probabilities(logits), semantic=semantic)

    def denoise(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: ConditionFeatures) -> torch.Tensor:
        """Predict the noise: ``x_t (B, M, *S)``, ``timesteps (B,)`` -> ``eps (B, M, *S)``."""
        self._check_spatial("noisy mask x_t", x_t, self.mask_channels)
        if cond.anchor.shape[0] != x_t.shape[0] or cond.anchor.shape[2:] != x_t.shape[2:]:
            raise ValueError(
                f"noisy mask {tuple(x_t.shape)} and condition features {tuple(cond.anchor.shape)} differ in batch or "
                "spatial size."
            )
        timesteps = torch.as_tensor(timesteps, device=x_t.device).reshape(-1)
        if timesteps.numel() == 1:
            timesteps = timesteps.expand(x_t.shape[0])
        net = self.diffusion_unet
        temb = self.time_embed(timesteps)
        hook = None
        if self.anchor is not None:
            anchor_map, gate = cond.anchor, self.anchor

            def hook(feature: torch.Tensor) -> torch.Tensor:
                return gate(feature, anchor_map)

        skips, e = net.encode(x_t, temb, stage0_hook=hook)
        if self.ssformer is not None:
            e = self.ssformer(e, cond.semantic.to(e.dtype), temb)
        return net.decode(net.middle(e, temb), skips, temb)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, with a clear error for weights of the other condition backbone (e.g. a
        checkpoint of bundle < 0.4.0, whose condition UNet was residual, loaded into the default network)."""
        found = _condition_backbone_of(state_dict)
        if found is not None and found != self.condition_backbone:
            raise ValueError(
                f"these weights have a {found!r} condition UNet but the network was built with condition_backbone="
                f"{self.condition_backbone!r}; build it with condition_backbone={found!r} (bundle configs: "
                f'"condition_backbone": "{found}"; checkpoints of bundle versions before 0.4.0 are "residual").'
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(
        self, x_t: torch.Tensor, image: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training forward: returns the noise prediction ``(B, M, *S)`` and the anchor logits ``(B, M, *S)``."""
        cond = self.condition(image)
        return self.denoise(x_t, timesteps, cond), cond.logits


def _condition_backbone_of(state_dict: Mapping[str, Any]) -> str | None:
    """Which condition backbone wrote ``state_dict`` (keys may carry a prefix such as DDP's ``module.``)."""
    for key in state_dict:
        if key.endswith("condition_unet.stem.weight"):
            return "residual"
        if key.endswith("condition_unet.enc_blocks.0.conv1.conv.weight"):
            return "plain"
    return None
