"""Tests for ``medsegdiff_bundle.evaluation.metrics``."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from medsegdiff_bundle.evaluation.metrics import case_metrics, format_summary_markdown, summarize_metrics


def _pair_2d():
    """pred: 2x2 square (4 px); target: the same square widened to 2x3 (6 px), overlap 4 px."""
    pred = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    target = torch.zeros_like(pred)
    pred[0, 0, 2:4, 2:4] = 1
    target[0, 0, 2:4, 2:5] = 1
    return pred, target


def _pair_3d(batch=1):
    """pred: 2x2x2 cube (8 vx); target: the cube extended by one voxel along the last axis (12 vx)."""
    pred = torch.zeros(batch, 1, 6, 6, 6, dtype=torch.long)
    target = torch.zeros_like(pred)
    pred[:, 0, 1:3, 1:3, 1:3] = 1
    target[:, 0, 1:3, 1:3, 1:4] = 1
    return pred, target


def test_case_metrics_2d_binary_hand_computed():
    """Dice = 2*4/(4+6), IoU = 4/6, HD95 = 1 voxel for a one-column boundary shift."""
    pred, target = _pair_2d()
    df = case_metrics(pred, target, num_classes=2, case_ids=["c0"])
    assert list(df.columns) == ["case", "class", "dice", "iou", "hd95"]
    assert len(df) == 1
    row = df.iloc[0]
    assert row["case"] == "c0" and row["class"] == "class_1"
    assert row["dice"] == pytest.approx(0.8)
    assert row["iou"] == pytest.approx(2 / 3)
    assert row["hd95"] == pytest.approx(1.0)


def test_case_metrics_3d_uses_spacing_for_hd95():
    """3D: Dice = 16/20, IoU = 8/12; HD95 is 1 voxel, or 2 mm when the shifted axis has spacing 2."""
    pred, target = _pair_3d(batch=2)
    df = case_metrics(pred, target, num_classes=2, case_ids=["a", "b"])
    assert df["case"].tolist() == ["a", "b"]
    np.testing.assert_allclose(df["dice"], 0.8, rtol=1e-6)
    np.testing.assert_allclose(df["iou"], 8 / 12, rtol=1e-6)
    np.testing.assert_allclose(df["hd95"], 1.0)
    df_mm = case_metrics(pred, target, num_classes=2, case_ids=["a", "b"], spacing=(1.0, 1.0, 2.0))
    np.testing.assert_allclose(df_mm["hd95"], 2.0)


def test_case_metrics_multiclass_present_missing_and_absent_classes():
    """Per class: partial overlap, predicted-only (dice 0, HD95 NaN), absent from both (dice 1, HD95 NaN), exact."""
    pred, target = _pair_2d()
    pred[0, 0, 6, 6] = 2  # class 2 predicted, not in the reference
    pred[0, 0, 0, 5:7] = 4  # class 4 identical in both
    target[0, 0, 0, 5:7] = 4
    # class 3 is in neither
    df = case_metrics(pred, target, num_classes=5, case_ids=["x"], class_names=["liver", "tumour", "cyst", "vessel"])
    assert df["class"].tolist() == ["liver", "tumour", "cyst", "vessel"]
    by = df.set_index("class")
    assert by.loc["liver", "dice"] == pytest.approx(0.8)
    assert by.loc["tumour", "dice"] == pytest.approx(0.0)
    assert by.loc["tumour", "iou"] == pytest.approx(0.0)
    assert math.isnan(by.loc["tumour", "hd95"])
    assert by.loc["cyst", "dice"] == pytest.approx(1.0)
    assert by.loc["cyst", "iou"] == pytest.approx(1.0)
    assert math.isnan(by.loc["cyst", "hd95"])
    assert by.loc["vessel", "dice"] == pytest.approx(1.0)
    assert by.loc["vessel", "hd95"] == pytest.approx(0.0)


def test_case_metrics_default_class_names_skip_background():
    """Without names, rows are ``class_1..class_{K-1}`` for every case, case-major."""
    pred, target = _pair_2d()
    pred, target = pred.repeat(2, 1, 1, 1), target.repeat(2, 1, 1, 1)
    df = case_metrics(pred, target, num_classes=3, case_ids=["a", "b"])
    assert df[["case", "class"]].values.tolist() == [
        ["a", "class_1"], ["a", "class_2"], ["b", "class_1"], ["b", "class_2"]
    ]


def test_case_metrics_shape_mismatch_raises():
    """Different pred/reference shapes are rejected with both shapes in the message."""
    pred = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    target = torch.zeros(1, 1, 8, 9, dtype=torch.long)
    with pytest.raises(ValueError, match=r"differ in shape"):
        case_metrics(pred, target, num_classes=2, case_ids=["a"])


def test_case_metrics_wrong_number_of_case_ids_raises():
    """One case id per case is required."""
    pred, target = _pair_2d()
    with pytest.raises(ValueError, match=r"2 case ids for 1 cases"):
        case_metrics(pred, target, num_classes=2, case_ids=["a", "b"])


def _table():
    return pd.DataFrame(
        {
            "case": ["a", "a", "b", "b", "c", "c"],
            "class": ["k1", "k2", "k1", "k2", "k1", "k2"],
            "dice": [0.9, 0.5, 0.7, 0.1, 0.8, 0.3],
            "iou": [0.8, 0.3, 0.6, 0.05, 0.7, 0.2],
            "hd95": [1.0, np.nan, 3.0, 10.0, 2.0, 6.0],
        }
    )


def test_summarize_metrics_matches_pandas():
    """Per-class mean/std equal pandas groupby; the overall row is the mean/std over cases of per-case means."""
    table = _table()
    summary = summarize_metrics(table).set_index("class")
    assert list(summary.index) == ["k1", "k2", "mean (all classes)"]
    for m in ("dice", "iou", "hd95"):
        per_class = table.groupby("class")[m]
        for cls in ("k1", "k2"):
            assert summary.loc[cls, f"{m}_mean"] == pytest.approx(per_class.mean()[cls])
            assert summary.loc[cls, f"{m}_std"] == pytest.approx(per_class.std()[cls])
        per_case = table.groupby("case")[m].mean()
        assert summary.loc["mean (all classes)", f"{m}_mean"] == pytest.approx(per_case.mean())
        assert summary.loc["mean (all classes)", f"{m}_std"] == pytest.approx(per_case.std())
    # spot-check one value by hand: dice of k2 = mean(0.5, 0.1, 0.3)
    assert summary.loc["k2", "dice_mean"] == pytest.approx(0.3)
    # NaN HD95 is skipped, not propagated: k2 hd95 = mean(10, 6)
    assert summary.loc["k2", "hd95_mean"] == pytest.approx(8.0)


def test_format_summary_markdown_rows_and_plus_minus():
    """Markdown has one row per class plus the overall row, ``mean ± std`` cells, and n/a for an all-NaN metric."""
    table = _table()
    table.loc[table["class"] == "k2", "hd95"] = np.nan
    md = format_summary_markdown(summarize_metrics(table))
    lines = md.splitlines()
    assert "±" in md
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["class", "dice", "iou", "hd95"]
    rows = {line.strip("|").split("|")[0].strip(): line for line in lines[2:]}
    assert set(rows) == {"k1", "k2", "mean (all classes)"}
    assert "0.8000 ± 0.1000" in rows["k1"]  # dice of k1: mean 0.8, std 0.1
    assert "n/a" in rows["k2"]
