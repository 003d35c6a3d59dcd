"""Mask <-> diffusion-space encoding (method doc section 6, item 10).

* binary (``num_classes == 2``): one foreground channel, ``x0 = 2 * fg - 1``.
* multi-class: ``num_classes`` one-hot channels including background, ``x0 = 2 * onehot - 1``.

Decoding maps ``x0`` back to per-class probabilities with ``num_classes`` channels in both cases
(binary: ``[1 - p, p]``), so that ``argmax`` over channels is the label map either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["mask_channels", "validate_label", "label_to_x0", "x0_to_probs", "channel_to_class_probs", "probs_to_label"]


def mask_channels(num_classes: int) -> int:
    """Channels the diffusion runs on: 1 for binary, ``num_classes`` otherwise."""
    return 1 if num_classes == 2 else num_classes


def validate_label(label: torch.Tensor, num_classes: int, name: str = "label") -> torch.Tensor:
    """Check an integer label map ``(B, 1, *S)`` and return it as ``long``.

    Raises:
        ValueError: when it has more than one channel, non-integer values, or values outside ``[0, num_classes)``.
    """
    if label.ndim < 3 or label.shape[1] != 1:
        raise ValueError(f"{name} must be a label map of shape (B, 1, *spatial), got {tuple(label.shape)}.")
    # the checks are reduced where the label is and read back in ONE transfer (each separate ``bool()``/``int()``
    # would stall a GPU queue once more), in two passes over the label: this runs at every training step
    if label.is_floating_point():
        lo, hi = torch.aminmax(label)
        # frac is non-zero for non-integers and NaN for inf/NaN: one flag for "anything but integers"
        off, lo, hi = torch.stack([label.frac().any().double(), lo.double(), hi.double()]).tolist()
        if off:  # the rare failing case pays for telling which problem it is
            finite = torch.isfinite(label)
            safe = torch.where(finite, label, torch.zeros_like(label))
            if bool((safe != safe.round()).any()):
                raise ValueError(f"{name} holds non-integer values; expected class indices 0..{num_classes - 1}.")
            raise ValueError(f"{name} holds non-finite values (inf/NaN); expected class indices 0..{num_classes - 1}.")
        lo, hi = int(lo), int(hi)
    else:
        lo, hi = (int(v) for v in torch.stack(list(torch.aminmax(label))).tolist())
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"{name} values span [{lo}, {hi}] but num_classes={num_classes} allows 0..{num_classes - 1}."
        )
    return label.long()


def label_to_x0(label: torch.Tensor, num_classes: int, check: bool = True) -> torch.Tensor:
    """Label map ``(B, 1, *S)`` -> clean diffusion sample ``x0 (B, M, *S)`` in ``{-1, 1}``.

    ``check=False`` skips :func:`validate_label` for a label already checked where it was cheaper (on the host,
    before its copy to the GPU): reading the check's result back from a GPU waits for the queued work.
    """
    label = validate_label(label, num_classes) if check else label.long()
    if num_classes == 2:
        onehot = label.float()
    else:
        onehot = F.one_hot(label[:, 0], num_classes).movedim(-1, 1).float()
    return onehot * 2.0 - 1.0


def round_x0(x0: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Soft ``x0 (B, M, *S)`` -> the most probable clean mask in the same ``{-1, 1}`` encoding.

    Binary: ``+1`` where ``x0 > 0``; multi-class: the one-hot argmax over channels. No device -> host transfer.
    """
    if num_classes == 2:
        return torch.where(x0 > 0, 1.0, -1.0).to(x0.dtype)
    # scatter rather than F.one_hot, whose value checks may read back from the device
    onehot = torch.zeros_like(x0).scatter_(1, x0.argmax(dim=1, keepdim=True), 1.0)
    return onehot * 2 - 1


def x0_to_probs(x0: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Predicted ``x0 (B, M, *S)`` -> class probabilities ``(B, num_classes, *S)``.

    ``p = clamp((x0 + 1) / 2, 0, 1)``; multi-class channels are renormalised to sum to one.
    """
    return channel_to_class_probs(((x0.float() + 1.0) / 2.0).clamp(0.0, 1.0), num_classes)


def channel_to_class_probs(p: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-channel probabilities ``(B, M, *S)`` in ``[0, 1]`` -> class probabilities ``(B, num_classes, *S)``."""
    if num_classes == 2:
        return torch.cat([1.0 - p, p], dim=1)
    total = p.sum(dim=1, keepdim=True)
    # where every channel is 0, fall back to uniform rather than dividing by zero
    return torch.where(total > 1e-6, p / total.clamp_min(1e-6), torch.full_like(p, 1.0 / num_classes))


def probs_to_label(probs: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``(B, K, *S)`` -> label map ``(B, 1, *S)`` (argmax; 0.5 threshold for binary)."""
    return probs.argmax(dim=1, keepdim=True)
