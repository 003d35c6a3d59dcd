"""Generated datasets -> fingerprint -> plan: the expected choices, end to end through real files."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from medsegdiff_bundle.data import write_synthetic_dataset
from medsegdiff_bundle.planning import extract_fingerprint, plan_dataset
from medsegdiff_bundle.planning.memory import predict_training_memory


def _volumes(root, n, shape, spacing, ct: bool, seed=0):
    """NIfTI volumes with a bright ellipsoid lesion; CT-like in HU (air -1000, tissue 40) or MR-like (0..1000)."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    (root / "lab").mkdir()
    entries = []
    for i in range(n):
        grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
        lesion = ((grid / 0.4) ** 2).sum(0) < 1
        body = ((grid / 0.9) ** 2).sum(0) < 1
        if ct:
            img = np.where(body, 40.0, -1000.0) + np.where(lesion, 60.0, 0.0) + rng.normal(0, 10, shape)
        else:
            img = np.where(body, 300.0, 0.0) + np.where(lesion, 500.0, 0.0) + rng.normal(0, 20, shape)
        affine = np.diag([*spacing, 1.0])
        nib.save(nib.Nifti1Image(img.astype(np.float32), affine), root / "img" / f"c{i}.nii.gz")
        nib.save(nib.Nifti1Image(lesion.astype(np.uint8), affine), root / "lab" / f"c{i}.nii.gz")
        entries.append({"image": f"img/c{i}.nii.gz", "label": f"lab/c{i}.nii.gz", "fold": i % 5})
    (root / "datalist.json").write_text(json.dumps({"training": entries}), encoding="utf-8")
    return root / "datalist.json"


def test_isotropic_ct_plans_3d_with_ct_normalisation(tmp_path):
    datalist = _volumes(tmp_path, 4, (48, 48, 40), (1.0, 1.0, 1.0), ct=True)
    fp = extract_fingerprint(str(datalist))
    plans = plan_dataset(fp, gpu_memory_gb=8.0, gpus=1)
    assert plans["configuration"] == "3d"
    assert plans["target_spacing"] == [1.0, 1.0, 1.0]
    assert plans["normalization"][0]["scheme"] == "ct"
    assert all(p % plans["network"]["divisor"] == 0 for p in plans["patch_size"])
    est = predict_training_memory(3, 1, 2, plans["network"]["channels"], plans["network"]["num_res_blocks"],
                                  plans["patch_size"], plans["batch_size"])
    assert est.total / 2**30 <= 8.0 * 0.85
    assert plan_dataset(fp, gpu_memory_gb=8.0, gpus=1) == plans  # deterministic


def test_anisotropic_mr_fires_the_anisotropy_rule(tmp_path):
    datalist = _volumes(tmp_path, 5, (64, 64, 12), (0.5, 0.5, 5.0), ct=False)
    # one case with finer slices: the 10th percentile of the coarse axis is below its median
    img = nib.load(tmp_path / "img" / "c0.nii.gz")
    for sub in ("img", "lab"):
        f = tmp_path / sub / "c0.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(nib.load(f).dataobj), np.diag([0.5, 0.5, 3.0, 1.0])), f)
    assert img.shape == (64, 64, 12)
    fp = extract_fingerprint(str(datalist))
    assert fp["spacing"]["median"] == [0.5, 0.5, 5.0]
    plans = plan_dataset(fp, gpu_memory_gb=8.0, gpus=1)
    assert plans["configuration"] == "3d"
    assert plans["target_spacing"][:2] == [0.5, 0.5]
    assert plans["target_spacing"][2] < 5.0  # not the median: nnU-Net's anisotropy rule
    assert [n["scheme"] for n in plans["normalization"]] == ["zscore"]


def test_2d_rgb_plans_2d_with_rgb_scaling(tmp_path):
    datalist = write_synthetic_dataset(tmp_path / "d", 6, (96, 80), num_classes=2, in_channels=3)
    plans = plan_dataset(extract_fingerprint(str(datalist)), gpu_memory_gb=8.0, gpus=1)
    assert plans["configuration"] == "2d"
    assert [n["scheme"] for n in plans["normalization"]] == ["rgb"] * 3
    assert max(plans["patch_size"]) <= 96 and plans["batch_size"] >= 2
