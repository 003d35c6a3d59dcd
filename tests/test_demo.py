"""The built-in demo runs through the bundle and writes every promised artefact; the CLI exposes it."""

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
from medsegdiff_bundle.engine import latest_checkpoint, load_checkpoint

pytestmark = pytest.mark.slow


def test_demo_2d_trains_evaluates_and_writes_results(tmp_path):
    summary = run_demo(str(tmp_path), image_size=32, num_cases=10, iterations=8, batch_size=4, channels=(8, 16, 32),
                       steps=3, ensemble=2)
    assert 0.0 <= summary["dice_mean"] <= 1.0 and summary["cases_evaluated"] == 2
    assert json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))["dice_mean"] == summary["dice_mean"]
    out = tmp_path / "eval" / "evaluation"
    table = pd.read_csv(out / "metrics.csv")
    assert list(table.columns) == ["case", "class", "dice", "iou", "hd95"] and len(table) == 2
    assert np.isclose(table["dice"].mean(), summary["dice_mean"])
    assert "±" in (out / "metrics_summary.md").read_text(encoding="utf-8")
    case = table["case"].iloc[0]
    pred = np.array(Image.open(out / f"{case}_seg.png"))
    assert pred.shape == (32, 32) and set(np.unique(pred)) <= {0, 1}
    assert (out / f"{case}_uncertainty.png").is_file()
    assert Image.open(out / f"{case}_overlay.png").size[0] > 100
    assert Image.open(tmp_path / "eval" / "training_curves.png").size[0] > 100
    assert len(pd.read_csv(tmp_path / "eval" / "training_log.csv")) == summary["epochs"] * 2  # 8 train cases / 4
    assert load_checkpoint(latest_checkpoint(tmp_path / "models"))["trainer"]["iteration"] == summary["epochs"] * 2
    assert "diffusion_unet.stem.weight" in load_checkpoint(tmp_path / "models" / "model.pt")


def test_demo_3d_multiclass_writes_nifti(tmp_path):
    summary = run_demo(str(tmp_path), spatial_dims=3, num_classes=3, image_size=16, num_cases=5, iterations=2,
                       batch_size=2, channels=(8, 16, 32), steps=2, ensemble=2)
    out = tmp_path / "eval" / "evaluation"
    table = pd.read_csv(out / "metrics.csv")
    assert len(table) == 2  # one held-out case, two foreground classes
    pred = nib.load(out / f"{table['case'].iloc[0]}_seg.nii.gz").get_fdata()
    assert pred.shape == (16, 16, 16) and pred.max() <= 2
    assert summary["cases_evaluated"] == 1


def test_cli_help_lists_demo_options():
    out = subprocess.run([sys.executable, "-m", "medsegdiff_bundle", "demo", "--help"], capture_output=True, encoding="utf-8", errors="replace",
                         timeout=120, env={"PAGER": "cat", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert "--output_dir" in text and "--sampler" in text


def test_cli_refuses_unknown_sampler_before_training(tmp_path):
    out = subprocess.run([sys.executable, "-m", "medsegdiff_bundle", "demo", "--sampler", "euler", "--output_dir",
                          str(tmp_path)], capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert out.returncode != 0
    assert "sampler must be one of" in out.stderr
    assert not (tmp_path / "models").exists()
