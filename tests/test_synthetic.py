"""Tests for ``medsegdiff_bundle.data.synthetic``."""

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medsegdiff_bundle.data.synthetic import make_synthetic_case, make_synthetic_dataset, write_synthetic_dataset

CASES = [((48, 40), 2), ((48, 40), 4), ((24, 20, 16), 2), ((24, 20, 16), 3)]


@pytest.mark.parametrize("size,num_classes", CASES)
def test_shapes_dtypes_and_label_values(size, num_classes):
    """Image is float32 (C, *S); label is uint8 (1, *S) with values in [0, K) and every class present."""
    image, label = make_synthetic_case(size, num_classes, in_channels=3, seed=1)
    assert image.shape == (3, *size) and image.dtype == np.float32
    assert label.shape == (1, *size) and label.dtype == np.uint8
    assert np.isfinite(image).all()
    assert set(np.unique(label).tolist()) == set(range(num_classes))


@pytest.mark.parametrize("size,num_classes", [((64, 64), 4), ((32, 32, 32), 3)])
def test_every_class_present_across_seeds(size, num_classes):
    """Later (smaller) classes never erase earlier ones at reasonable sizes, for many seeds."""
    for seed in range(10):
        _, label = make_synthetic_case(size, num_classes, in_channels=1, seed=seed)
        assert set(np.unique(label).tolist()) == set(range(num_classes)), seed


def test_deterministic_given_seed():
    """Same seed -> identical arrays; different seed -> different image and label."""
    a_img, a_lab = make_synthetic_case((32, 32), 3, seed=5)
    b_img, b_lab = make_synthetic_case((32, 32), 3, seed=5)
    c_img, c_lab = make_synthetic_case((32, 32), 3, seed=6)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert not np.array_equal(a_img, c_img)
    assert not np.array_equal(a_lab, c_lab)


def test_dataset_case_i_uses_seed_plus_i():
    """make_synthetic_dataset's case i equals make_synthetic_case with seed + i."""
    cases = make_synthetic_dataset(3, (16, 16), 2, in_channels=2, seed=10)
    assert len(cases) == 3
    img, lab = make_synthetic_case((16, 16), 2, 2, seed=12)
    assert np.array_equal(cases[2]["image"], img) and np.array_equal(cases[2]["label"], lab)


@pytest.mark.parametrize("size,num_classes", [((64, 64), 3), ((24, 24, 24), 3)])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_each_class_differs_from_background(size, num_classes, in_channels):
    """Every foreground class has a mean intensity well apart from background (> 0.5 noise std) in some channel."""
    for seed in range(5):
        image, label = make_synthetic_case(size, num_classes, in_channels, seed=seed, noise=0.15)
        bg = label[0] == 0
        for cls in range(1, num_classes):
            fg = label[0] == cls
            gap = max(abs(image[ch][fg].mean() - image[ch][bg].mean()) for ch in range(in_channels))
            assert gap > 0.075, (seed, cls, gap)


def test_rejects_fewer_than_two_classes():
    """num_classes < 2 is not a segmentation task."""
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        make_synthetic_case((8, 8), num_classes=1)


def _read_datalist(path, out_dir, num_cases):
    assert path == out_dir / "datalist.json"
    entries = json.loads(path.read_text(encoding="utf-8"))["training"]
    assert len(entries) == num_cases
    assert sorted({e["fold"] for e in entries}) == [0, 1, 2, 3, 4]
    for e in entries:
        for key in ("image", "label"):
            assert not e[key].startswith("/") and (out_dir / e[key]).is_file()
    return entries


@pytest.mark.parametrize("in_channels", [1, 3])
def test_write_2d_png_readable_with_same_labels(tmp_path, in_channels):
    """2D cases are PNGs (grey or RGB) whose label pixels equal the generated labels; datalist has folds 0..4."""
    num_cases = 6
    path = write_synthetic_dataset(tmp_path, num_cases, (32, 24), num_classes=3, in_channels=in_channels, seed=3)
    entries = _read_datalist(path, tmp_path, num_cases)
    expected = make_synthetic_dataset(num_cases, (32, 24), 3, in_channels, seed=3)
    for e, case in zip(entries, expected):
        assert e["image"].endswith(".png") and e["label"].endswith(".png")
        lab = np.asarray(Image.open(tmp_path / e["label"]))
        assert np.array_equal(lab, case["label"][0])
        img = np.asarray(Image.open(tmp_path / e["image"]))
        assert img.shape == ((32, 24) if in_channels == 1 else (32, 24, 3))
        np.testing.assert_allclose(
            img.astype(np.float32) / 255, np.squeeze(np.moveaxis(np.clip(case["image"], 0, 1), 0, -1)), atol=1 / 255
        )


def test_write_3d_nifti_readable_with_same_labels(tmp_path):
    """3D cases are NIfTI volumes (image channels last) whose labels equal the generated labels."""
    num_cases = 5
    path = write_synthetic_dataset(tmp_path, num_cases, (12, 10, 8), num_classes=3, in_channels=2, seed=0)
    entries = _read_datalist(path, tmp_path, num_cases)
    assert [e["fold"] for e in entries] == [0, 1, 2, 3, 4]
    expected = make_synthetic_dataset(num_cases, (12, 10, 8), 3, 2, seed=0)
    for e, case in zip(entries, expected):
        assert e["image"].endswith(".nii.gz") and e["label"].endswith(".nii.gz")
        lab = np.asarray(nib.load(tmp_path / e["label"]).dataobj)
        assert lab.shape == (12, 10, 8)
        assert np.array_equal(lab, case["label"][0])
        img = np.asarray(nib.load(tmp_path / e["image"]).dataobj)
        np.testing.assert_allclose(img, np.moveaxis(case["image"], 0, -1), rtol=1e-6)
