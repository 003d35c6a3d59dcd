"""Synthetic segmentation data for the demo and the fast tests (2D/3D, binary/multi-class).

Each case is a textured background with randomly placed, randomly rotated ellipses (ellipsoids in 3D); every
foreground class has its own intensity signature per channel and its own texture, then Gaussian noise is
added. Generation is deterministic given the seed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

__all__ = ["make_synthetic_case", "make_synthetic_dataset", "write_synthetic_dataset", "ensure_synthetic_datalist"]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / (field.std() + 1e-8)


def _random_ellipsoid(rng: np.random.Generator, shape: tuple[int, ...], scale: tuple[float, float]) -> np.ndarray:
    dims = len(shape)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    centre = [rng.uniform(0.25 * n, 0.75 * n) for n in shape]
    radii = [rng.uniform(scale[0] * n, scale[1] * n) for n in shape]
    rot, _ = np.linalg.qr(rng.standard_normal((dims, dims)))  # random rotation
    coords = np.stack([g - c for g, c in zip(grids, centre)], axis=-1) @ rot
    return (sum((coords[..., i] / radii[i]) ** 2 for i in range(dims)) <= 1.0)


def make_synthetic_case(
    spatial_size: Sequence[int] = (64, 64),
    num_classes: int = 2,
    in_channels: int = 3,
    seed: int = 0,
    noise: float = 0.15,
) -> tuple[np.ndarray, np.ndarray]:
    """One case.

    Args:
        spatial_size: ``(H, W)`` or ``(H, W, D)``.
        num_classes: classes including background.
        in_channels: image channels.
        seed: RNG seed.
        noise: standard deviation of the additive Gaussian noise.

    Returns:
        image ``(in_channels, *spatial_size)`` float32 roughly in ``[0, 1]`` and label ``(1, *spatial_size)`` uint8.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
    shape = tuple(int(s) for s in spatial_size)
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.uint8)
    for cls in range(1, num_classes):
        # later classes are smaller so they sit inside or beside earlier ones rather than erase them
        scale = (0.12, 0.28) if cls == 1 else (0.08, 0.16)
        for _ in range(rng.integers(1, 3) if cls == 1 else 1):
            label[_random_ellipsoid(rng, shape, scale)] = cls
    smooth_sigma = max(shape) / 16
    image = np.empty((in_channels, *shape), dtype=np.float32)
    for ch in range(in_channels):
        img = 0.35 + 0.08 * _smooth_noise(rng, shape, smooth_sigma)
        for cls in range(1, num_classes):
            offset = rng.uniform(0.2, 0.4) * (1 if (cls + ch) % 2 else -0.5)
            texture = 0.06 * _smooth_noise(rng, shape, 1.5)
            img = np.where(label == cls, img + offset + texture, img)
        image[ch] = img + noise * rng.standard_normal(shape)
    return image.astype(np.float32), label[None]


def make_synthetic_dataset(
    num_cases: int,
    spatial_size: Sequence[int] = (64, 64),
    num_classes: int = 2,
    in_channels: int = 3,
    seed: int = 0,
    noise: float = 0.15,
) -> list[dict[str, np.ndarray]]:
    """``num_cases`` cases as ``[{"image": (C, *S), "label": (1, *S)}, ...]``; case ``i`` uses seed ``seed + i``."""
    cases = []
    for i in range(num_cases):
        image, label = make_synthetic_case(spatial_size, num_classes, in_channels, seed + i, noise)
        cases.append({"image": image, "label": label})
    return cases


def write_synthetic_dataset(
    out_dir: str | Path,
    num_cases: int,
    spatial_size: Sequence[int] = (64, 64),
    num_classes: int = 2,
    in_channels: int = 3,
    seed: int = 0,
    num_folds: int = 5,
) -> Path:
    """Write cases to disk (2D: PNG, 3D: NIfTI) with an MSD-style ``datalist.json`` (``training`` with folds).

    Returns:
        the path of ``datalist.json``; image/label paths in it are relative to ``out_dir``.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    entries = []
    for i, case in enumerate(make_synthetic_dataset(num_cases, spatial_size, num_classes, in_channels, seed)):
        name = f"case_{i:04d}"
        if len(spatial_size) == 2:
            from PIL import Image

            img = np.clip(case["image"], 0, 1) * 255
            img = img[0] if in_channels == 1 else np.moveaxis(img, 0, -1)
            Image.fromarray(img.astype(np.uint8)).save(out / "images" / f"{name}.png")
            Image.fromarray(case["label"][0]).save(out / "labels" / f"{name}.png")
            ext = ".png"
        else:
            import nibabel as nib

            affine = np.diag([1.0, 1.0, 1.0, 1.0])
            image = case["image"][0] if in_channels == 1 else np.moveaxis(case["image"], 0, -1)  # 3D or 4D channel-last
            nib.save(nib.Nifti1Image(image, affine), out / "images" / f"{name}.nii.gz")
            nib.save(nib.Nifti1Image(case["label"][0], affine), out / "labels" / f"{name}.nii.gz")
            ext = ".nii.gz"
        entries.append({"image": f"images/{name}{ext}", "label": f"labels/{name}{ext}", "fold": i % num_folds})
    datalist = out / "datalist.json"
    datalist.write_text(json.dumps({"training": entries}, indent=2), encoding="utf-8")
    return datalist


def ensure_synthetic_datalist(
    datalist: str | Path,
    num_cases: int = 40,
    spatial_size: Sequence[int] = (64, 64),
    num_classes: int = 2,
    in_channels: int = 3,
    seed: int = 0,
) -> str:
    """Return ``datalist``; if it does not exist, write a synthetic dataset next to it first.

    This is the bundle's built-in default data, so that ``python -m monai.bundle run training`` works out of the
    box; a user's own ``--datalist`` that exists is never touched.
    """
    path = Path(datalist)
    if not path.exists():
        written = write_synthetic_dataset(path.parent, num_cases, spatial_size, num_classes, in_channels, seed)
        if written != path:
            written.replace(path)
    return str(path)
