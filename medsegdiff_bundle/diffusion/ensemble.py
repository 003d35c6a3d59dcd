"""Fusing ensemble members and measuring their disagreement.

Members are class probabilities stacked as ``(N, B, K, *S)``.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["FUSIONS", "UNCERTAINTIES", "fuse_mean", "fuse_staple", "fuse", "uncertainty_std", "uncertainty_entropy", "uncertainty"]

FUSIONS = ("mean", "staple")
UNCERTAINTIES = ("std", "entropy")


def fuse_mean(members: torch.Tensor) -> torch.Tensor:
    """Mean probability over members: ``(N, B, K, *S) -> (B, K, *S)``."""
    return members.mean(dim=0)


def fuse_staple(members: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """SimpleITK STAPLE (Warfield et al. 2004) over binarised members; binary tasks only.

    ``(N, B, 2, *S) -> (B, 2, *S)``: the STAPLE foreground probability and its complement.
    """
    if members.shape[2] != 2:
        raise ValueError(f"STAPLE fusion is for binary segmentation (2 classes), got {members.shape[2]} classes.")
    import SimpleITK as sitk  # only this optional fusion needs it (the package runs without SimpleITK elsewhere)

    fused = []
    for b in range(members.shape[1]):
        votes = [
            sitk.GetImageFromArray((members[n, b, 1] > threshold).to(torch.uint8).cpu().numpy())
            for n in range(members.shape[0])
        ]
        if all(not sitk.GetArrayViewFromImage(v).any() for v in votes):
            fg = np.zeros(tuple(members.shape[3:]), dtype=np.float32)  # STAPLE is undefined with no foreground
        else:
            fg = sitk.GetArrayFromImage(sitk.STAPLE(votes, 1.0)).astype(np.float32)
        fused.append(torch.from_numpy(fg))
    fg_t = torch.stack(fused).to(members.device).unsqueeze(1)
    return torch.cat([1 - fg_t, fg_t], dim=1)


def fuse(members: torch.Tensor, method: str = "mean") -> torch.Tensor:
    """Fuse ``(N, B, K, *S)`` members by ``method`` in ``FUSIONS``."""
    if method == "mean":
        return fuse_mean(members)
    if method == "staple":
        return fuse_staple(members)
    raise ValueError(f"fusion must be one of {FUSIONS}, got {method!r}.")


def uncertainty_std(members: torch.Tensor) -> torch.Tensor:
    """Per-voxel standard deviation across members, averaged over the foreground classes: ``(B, 1, *S)``.

    For binary this is the std of the foreground probability; a single member gives zeros.
    """
    if members.shape[0] < 2:
        return torch.zeros_like(members[0, :, :1])
    std = members.std(dim=0, unbiased=False)
    return std[:, 1:].mean(dim=1, keepdim=True)


def uncertainty_entropy(members: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the mean class distribution: ``(B, 1, *S)``, in ``[0, log K]``."""
    p = members.mean(dim=0).clamp_min(1e-8)
    return -(p * p.log()).sum(dim=1, keepdim=True)


def uncertainty(members: torch.Tensor, method: str = "std") -> torch.Tensor:
    """Uncertainty map ``(B, 1, *S)`` by ``method`` in ``UNCERTAINTIES``."""
    if method == "std":
        return uncertainty_std(members)
    if method == "entropy":
        return uncertainty_entropy(members)
    raise ValueError(f"uncertainty must be one of {UNCERTAINTIES}, got {method!r}.")
