"""The built-in demo writes every promised artefact, and the CLI exposes it."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medsegdiff_bundle.demo import run_demo
from medsegdiff_bundle.engine import load_checkpoint


def test_demo_2d_writes_predictions_maps_overlays_and_metrics(tmp_path):
    summary = run_demo(str(tmp_path), image_size=32, train_cases=4, test_cases=2, iterations=15, steps=3, ensemble=2)
    assert 0.0 <= summary["dice_mean"] <= 1.0
    assert json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))["dice_mean"] == summary["dice_mean"]
    table = pd.read_csv(tmp_path / "metrics.csv")
    assert list(table.columns) == ["case", "class", "dice", "iou", "hd95"] and len(table) == 2
    assert np.isclose(table["dice"].mean(), summary["dice_mean"])
    assert "±" in (tmp_path / "metrics_summary.md").read_text(encoding="utf-8")
    pred = np.array(Image.open(tmp_path / "predictions" / "case_000_pred.png"))
    assert pred.shape == (32, 32) and set(np.unique(pred)) <= {0, 1}
    assert (tmp_path / "predictions" / "case_001_uncertainty.png").is_file()
    assert Image.open(tmp_path / "overlays" / "case_000.png").size[0] > 100
    assert Image.open(tmp_path / "training_curves.png").size[0] > 100
    assert len(pd.read_csv(tmp_path / "training_log.csv")) == 15
    ckpt = load_checkpoint(tmp_path / "model.pt")
    assert ckpt["config"]["num_classes"] == 2 and "network" in ckpt


def test_demo_3d_multiclass_writes_nifti(tmp_path):
    summary = run_demo(str(tmp_path), spatial_dims=3, num_classes=3, image_size=16, train_cases=2, test_cases=1,
                       iterations=3, batch_size=2, steps=2, ensemble=2)
    pred = nib.load(tmp_path / "predictions" / "case_000_pred.nii.gz").get_fdata()
    assert pred.shape == (16, 16, 16) and pred.max() <= 2
    assert len(pd.read_csv(tmp_path / "metrics.csv")) == 2  # two foreground classes
    assert summary["config"]["spatial_dims"] == 3


def test_cli_help_lists_demo_options():
    out = subprocess.run([sys.executable, "-m", "medsegdiff_bundle", "demo", "--help"], capture_output=True, text=True,
                         timeout=120, env={"PAGER": "cat", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert "--output_dir" in text and "--sampler" in text and "DiffusionSampler" not in text


@pytest.mark.parametrize("bad", [["demo", "--sampler", "euler"]])
def test_cli_refuses_unknown_sampler(bad, tmp_path):
    out = subprocess.run([sys.executable, "-m", "medsegdiff_bundle", *bad, "--output_dir", str(tmp_path), "--iterations", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "sampler must be one of" in out.stderr
