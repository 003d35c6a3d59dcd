"""Training objective of MedSegDiff-V2 (method doc E1)::

    L_t = MSE(eps_hat, eps) + [t mod alpha == 0] * (Dice(anchor) + beta * CE(anchor))

(with ``prediction_type="sample"``, our default, the first term is ``MSE(x0_hat, x0)``).

The anchor term supervises the condition model's segmentation head; the indicator is applied per sample.
Binary tasks use sigmoid Dice + BCE, multi-class softmax Dice + CE (MONAI ``DiceCELoss``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

from .labels import validate_label

__all__ = ["MedSegDiffLoss"]


class MedSegDiffLoss(nn.Module):
    """Diffusion regression MSE (noise or x0) plus the anchor Dice + CE loss.

    Args:
        num_classes: classes including background.
        alpha: supervise the anchor on samples whose timestep is a multiple of ``alpha`` (1 = always).
        beta: weight of the CE term inside the anchor loss.
        anchor_weight: overall weight of the anchor loss.

    ``forward(prediction, target (B, M, *S), anchor_logits (B, M, *S), label (B, 1, *S), timesteps (B,))``
    returns a dict with ``loss`` (to back-propagate), ``diffusion`` and ``anchor`` (detached, for logging).
    """

    def __init__(self, num_classes: int, alpha: int = 1, beta: float = 1.0, anchor_weight: float = 1.0) -> None:
        super().__init__()
        if alpha < 1:
            raise ValueError(f"alpha must be >= 1, got {alpha}.")
        self.num_classes = num_classes
        self.alpha = alpha
        self.anchor_weight = anchor_weight
        binary = num_classes == 2
        self.anchor_loss = DiceCELoss(
            sigmoid=binary, softmax=not binary, to_onehot_y=not binary, lambda_dice=1.0, lambda_ce=beta
        )

    def forward(
        self,
        prediction: torch.Tensor,
        target: torch.Tensor,
        anchor_logits: torch.Tensor,
        label: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        label = validate_label(label, self.num_classes)
        diffusion_loss = F.mse_loss(prediction.float(), target.float())
        anchor_target = label.float() if self.num_classes == 2 else label
        if self.alpha == 1:  # every sample is supervised: no indicator to read back from the device
            anchor = self.anchor_loss(anchor_logits.float(), anchor_target)
            return self._total(diffusion_loss, anchor)
        selected = (timesteps % self.alpha) == 0
        anchor = diffusion_loss.new_zeros(())
        if bool(selected.any()):
            anchor = self.anchor_loss(anchor_logits[selected].float(), anchor_target[selected])
            # mean over the batch of indicator * L_i  ==  (fraction selected) * mean over the selected samples
            anchor = anchor * selected.float().mean()
        return self._total(diffusion_loss, anchor)

    def _total(self, diffusion_loss: torch.Tensor, anchor: torch.Tensor) -> dict[str, torch.Tensor]:
        total = diffusion_loss + self.anchor_weight * anchor
        return {"loss": total, "diffusion": diffusion_loss.detach(), "anchor": anchor.detach()}
