"""Pictures a person would rather see than read: overlays, uncertainty maps, training curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

__all__ = [
    "radiological_axial", "representative_slice", "save_overlay", "save_training_curves", "save_trajectory_plot",
]


def _save(fig: plt.Figure, path: str | Path, top: float = 1.0) -> Path:
    """Lay out ``fig`` within the top ``top`` share of its height (the rest holds a figure title), write, close."""
    fig.tight_layout(rect=(0.0, 0.0, 1.0, top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def representative_slice(label: np.ndarray) -> int:
    """Index along the last axis of a 3D label ``(H, W, D)`` with the most foreground (the middle if none)."""
    counts = (label > 0).reshape(-1, label.shape[-1]).sum(axis=0)
    return int(counts.argmax()) if counts.max() > 0 else label.shape[-1] // 2


def _to_display(image: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` -> ``(H, W)`` or ``(H, W, 3)`` scaled to ``[0, 1]`` for display."""
    img = image[:3] if image.shape[0] >= 3 else image[:1]
    lo, hi = np.percentile(img, (0.5, 99.5))
    img = np.clip((img - lo) / max(hi - lo, 1e-8), 0, 1)
    return np.moveaxis(img, 0, -1) if img.shape[0] == 3 else img[0]


def radiological_axial(plane: np.ndarray) -> np.ndarray:
    """An axial plane of a RAS-ordered volume, ``(..., x, y)``, as radiology shows it: ``(..., y, x)`` with anterior
    at the top and the patient's right on the left."""
    return np.flip(np.swapaxes(plane, -2, -1), axis=(-2, -1))


def save_overlay(
    path: str | Path,
    image: np.ndarray,
    prediction: np.ndarray,
    reference: np.ndarray | None = None,
    uncertainty: np.ndarray | None = None,
    title: str = "",
) -> Path:
    """Save a PNG with panels: image, prediction contours (and reference), uncertainty heat map.

    Args:
        path: output PNG.
        image: ``(C, H, W)`` or ``(C, X, Y, Z)``. 3D arrays are in RAS order (:class:`SaveOverlayd` reorients them
            so): the axial slice with most predicted/reference foreground is shown in radiological convention
            (:func:`radiological_axial`).
        prediction: label map ``(H, W)`` or ``(X, Y, Z)``.
        reference: optional ground truth, same shape.
        uncertainty: optional map, same shape.
        title: figure title (e.g. the case id); none when empty.
    """
    if prediction.ndim == 3:
        z = representative_slice(reference if reference is not None and reference.any() else prediction)
        image, prediction = radiological_axial(image[..., z]), radiological_axial(prediction[..., z])
        reference = None if reference is None else radiological_axial(reference[..., z])
        uncertainty = None if uncertainty is None else radiological_axial(uncertainty[..., z])
    disp = _to_display(image)
    panels = 2 + (uncertainty is not None)
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.4))
    axes[0].imshow(disp, cmap="gray")
    axes[0].set_title("image")
    axes[1].imshow(disp, cmap="gray")
    labels = [c for c in np.unique(prediction) if c > 0]
    if reference is not None:
        labels = sorted(set(labels) | {c for c in np.unique(reference) if c > 0})
    for c in labels:
        colour = plt.cm.tab10((c - 1) % 10)
        if (prediction == c).any():
            axes[1].contour(prediction == c, levels=[0.5], colors=[colour], linewidths=1.5)
        if reference is not None and (reference == c).any():
            # yellow dashes stay visible on top of any class colour
            axes[1].contour(reference == c, levels=[0.5], colors=["yellow"], linewidths=1.0, linestyles="dashed")
    contours = "prediction (solid) / reference (yellow dashed)" if reference is not None else "prediction"
    axes[1].set_title(contours, fontsize=8)
    if uncertainty is not None:
        im = axes[2].imshow(uncertainty, cmap="magma")
        axes[2].set_title("ensemble uncertainty")
        fig.colorbar(im, ax=axes[2], fraction=0.046)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path, top=0.93 if title else 1.0)  # tight_layout alone puts the panels' titles under it


def _finish(ax: plt.Axes, xlabel: str, integer_x: bool = False) -> None:
    """Label the x axis (integer ticks for counts such as epochs and steps), add the legend and a light grid."""
    ax.set_xlabel(xlabel)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    ax.grid(alpha=0.3)


def save_training_curves(
    path: str | Path,
    history: Mapping[str, Sequence[float]],
    x_key: str = "iteration",
    validation: Mapping[str, Sequence[float]] | None = None,
) -> Path:
    """Plot every series in ``history`` (except ``x_key``) against ``x_key`` on a log y-axis; with ``validation``
    (``{"epoch": [...], metric: [...], ...}``), its metrics go to a second panel against the epoch, on a linear
    axis (e.g. the sampled result's Dice beside the anchor's)."""
    panels = 2 if validation and len(validation.get("epoch", [])) else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 3.5), squeeze=False)
    ax = axes[0, 0]
    x = history[x_key]
    for key, values in history.items():
        if key != x_key:
            ax.plot(x, values, label=key, linewidth=1)
    ax.set_yscale("log")
    _finish(ax, x_key)
    if panels == 2:
        ax = axes[0, 1]
        for key, values in validation.items():
            if key != "epoch":
                ax.plot(validation["epoch"], values, marker="o", markersize=3, linewidth=1, label=key)
        ax.set_title("validation")
        _finish(ax, "epoch", integer_x=True)
    return _save(fig, path)


def save_trajectory_plot(path: str | Path, table: Mapping[str, Sequence[float]], summary: Mapping[str, float]) -> Path:
    """Dice of the predicted mask after each sampler step (``table``: ``step``, ``dice``) with the anchor's Dice
    (``summary["anchor_dice"]``) as a reference line; see :mod:`medsegdiff_bundle.evaluation.trajectory`."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [int(s) + 1 for s in table["step"]]
    ax.plot(steps, list(table["dice"]), marker="o", markersize=3, linewidth=1, label="predicted x0 after step")
    ax.axhline(summary["anchor_dice"], color="tab:orange", linestyle="--", linewidth=1, label="anchor (condition model)")
    ax.set_ylabel("Dice")
    _finish(ax, "sampler step", integer_x=True)
    return _save(fig, path)
