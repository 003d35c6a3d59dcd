"""The bundle on the real data in ../shared/data (skipped when it is absent): Kvasir-SEG polyps (2D RGB, binary
JPEG masks) train and evaluate end to end; the BraTS sample (3D, FLAIR + T1c, labels 0-4) trains in 3D and its
sliding-window inference writes a label map with the input's affine."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from tests.bundle_utils import SHARED_DATA, run_workflow

pytestmark = pytest.mark.slow

KVASIR = SHARED_DATA / "Kvasir-SEG"
BRATS = SHARED_DATA / "BraTS2015-deepmedic-sample"


@pytest.mark.skipif(not (KVASIR / "images").is_dir(), reason="Kvasir-SEG not in ../shared/data")
def test_kvasir_trains_and_evaluates_end_to_end(tmp_path):
    images = sorted((KVASIR / "images").glob("*.jpg"))[:20]
    cases = [{"image": str(p), "label": str(KVASIR / "masks" / p.name), "fold": i % 5} for i, p in enumerate(images)]
    datalist = tmp_path / "kvasir.json"
    datalist.write_text(json.dumps({"training": cases}), encoding="utf-8")
    settings = {"datalist": str(datalist), "dataset_dir": str(KVASIR), "patch_size": [64, 64], "label_threshold": 127}
    run_workflow("train", "train", tmp_path, batch_size=4, max_epochs=2, val_interval=2, val_steps=2, **settings)
    run_workflow("evaluate", "infer", tmp_path, steps=3, ensemble=2, **settings)
    table = pd.read_csv(tmp_path / "eval" / "evaluation" / "metrics.csv")
    assert len(table) == 4  # the 4 fold-0 cases, one foreground class
    assert table["dice"].between(0, 1).all() and table["iou"].between(0, 1).all()
    first = table["case"].iloc[0]
    seg = np.array(__import__("PIL.Image", fromlist=["Image"]).open(tmp_path / "eval" / "evaluation" / f"{first}_seg.png"))
    source = np.array(__import__("PIL.Image", fromlist=["Image"]).open(KVASIR / "images" / f"{first}.jpg"))
    assert seg.shape == source.shape[:2]  # original resolution, not the 64x64 training size


@pytest.mark.skipif(not BRATS.is_dir(), reason="BraTS sample not in ../shared/data")
def test_brats_3d_multiclass_training_and_sliding_window_inference(tmp_path):
    def case(split: str, name: str, fold: int) -> dict:
        folder = BRATS / split / name
        return {"image": [str(folder / "Flair_subtrMeanDivStd.nii.gz"), str(folder / "T1c_subtrMeanDivStd.nii.gz")],
                "label": str(folder / "OTMultiClass.nii.gz"), "fold": fold}

    cases = [case("train", "brats_2013_pat0005_1", 1), case("test", "brats_2013_pat0001_1", 0)]
    datalist = tmp_path / "brats.json"
    datalist.write_text(json.dumps({"training": cases}), encoding="utf-8")
    settings = {"datalist": str(datalist), "dataset_dir": str(BRATS), "spatial_dims": 3, "in_channels": 2,
                "num_classes": 5, "patch_size": [32, 32, 32], "target_spacing": [4.0, 4.0, 4.0], "normalization": "none"}
    run_workflow("train", "train", tmp_path, batch_size=2, num_samples=2, max_epochs=2, val_interval=2, val_steps=2,
                 **settings)
    run_workflow("inference", "infer", tmp_path, steps=2, ensemble=1, save_overlay=False, **settings)
    source = nib.load(cases[1]["label"])
    seg = nib.load(tmp_path / "eval" / "inference" / "Flair_subtrMeanDivStd_seg.nii.gz")
    assert seg.shape == source.shape
    np.testing.assert_allclose(seg.affine, source.affine, atol=1e-4)
    values = np.unique(np.asarray(seg.dataobj))
    assert values.min() >= 0 and values.max() <= 4
