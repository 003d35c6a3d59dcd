"""Test-time mirroring: ensemble members that see the image mirrored along some spatial axes.

nnU-Net averages a network's predictions over every mirroring of the input along the axes it was trained to be
invariant to. A diffusion ensemble already runs ``N`` members per image, so mirroring costs almost nothing there:
member ``j`` sees view ``j mod V`` of the ``V`` distinct mirrorings, its sample is mirrored back, and the fusion
averages over noise and mirroring at once. Only the condition network runs more often (once per view instead of
once per image; it runs once per image, not once per step, so that is a small share of the sampling time).

A view is a tuple of tensor dimensions of a channel-first batch ``(B, C, *S)`` (spatial axis ``a`` is dimension
``a + 2``); ``()`` is the image as it is. A flip is its own inverse, so the same view mirrors back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import combinations

import torch

__all__ = ["check_mirror_axes", "mirror_views", "mirror", "unmirror_members", "mirrored_mean"]


def check_mirror_axes(axes: Sequence[int] | None, spatial_dims: int | None = None) -> tuple[int, ...]:
    """Validate spatial mirroring axes (0-based, e.g. ``(0, 1)`` in 2D) and return them sorted.

    ``None`` or ``()`` turns mirroring off. With ``spatial_dims`` given, every axis must be below it.
    """
    if axes is None:
        return ()
    try:
        out = tuple(sorted(int(a) for a in axes))
    except (TypeError, ValueError):
        raise ValueError(f"mirror_axes must be a sequence of spatial axis indices, got {axes!r}.") from None
    if len(set(out)) != len(out) or any(a < 0 for a in out):
        raise ValueError(f"mirror_axes must be distinct non-negative spatial axes, got {list(axes)}.")
    if spatial_dims is not None and any(a >= spatial_dims for a in out):
        raise ValueError(f"mirror_axes {list(out)} name an axis beyond the {spatial_dims} spatial dimensions.")
    return out


def mirror_views(axes: Sequence[int] | None, members: int) -> list[tuple[int, ...]]:
    """The distinct views of ``members`` ensemble members: at most ``members`` of the ``2 ** len(axes)``
    mirrorings, the image itself first, then single axes, then pairs, ... (so that a small ensemble gets the
    most different views). Member ``j`` uses view ``j % len(views)``.

    Example: axes ``(0, 1)`` and 5 members give ``[(), (2,), (3,), (2, 3)]``; member 4 sees the image as it is.
    """
    dims = [a + 2 for a in check_mirror_axes(axes)]
    views = [v for k in range(len(dims) + 1) for v in combinations(dims, k)]
    return views[: max(1, members)]


def mirror(x: torch.Tensor, view: tuple[int, ...]) -> torch.Tensor:
    """``x`` mirrored along the dimensions of ``view`` (``x`` itself for the empty view)."""
    return x.flip(view) if view else x


def unmirror_members(x: torch.Tensor, views: Sequence[tuple[int, ...]], members: int) -> torch.Tensor:
    """Mirror each member back: ``x (B * N, ...)``, members of an image adjacent, member ``j`` in view
    ``views[j % len(views)]`` -> the same shape, every member in the image's own orientation."""
    if len(views) == 1 and not views[0]:
        return x
    per_member = x.unflatten(0, (-1, members))
    back = [mirror(per_member[:, j], views[j % len(views)]) for j in range(members)]
    return torch.stack(back, dim=1).flatten(0, 1)


def mirrored_mean(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, axes: Sequence[int] | None
                  ) -> torch.Tensor:
    """nnU-Net-style mirroring of a plain (discriminative) predictor: the mean of ``predict`` over every mirroring
    of ``x (B, C, *S)`` along ``axes``, each output mirrored back (``predict`` keeps the spatial shape)."""
    views = mirror_views(axes, 2 ** len(check_mirror_axes(axes)))
    total = None
    for view in views:
        out = mirror(predict(mirror(x, view)), view)
        total = out if total is None else total + out
    return total / len(views)
