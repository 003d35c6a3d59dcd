"""The MONAI bundle end to end (Model-Zoo style): train and infer through ConfigWorkflow on generated PNG and
NIfTI data, outputs in the input's geometry, exact resume, and bad input."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medsegdiff_bundle.data import write_synthetic_dataset
from medsegdiff_bundle.engine import bf16_is_fast, bundle_workflow, latest_checkpoint, load_checkpoint
from tests.bundle_utils import CONFIGS, REPO, TINY, run_workflow, workflow

pytestmark = pytest.mark.slow

TRAIN_2D = {"patch_size": [32, 32], "batch_size": 4, "max_epochs": 2, "val_interval": 1, "val_steps": 2}
INFER_2D = {"patch_size": [32, 32], "steps": 2, "ensemble": 2}


@pytest.fixture(scope="module")
def trained_2d(tmp_path_factory):
    """A tiny 2D bundle trained on non-square RGB PNGs (catches transposed or resized outputs)."""
    root = tmp_path_factory.mktemp("bundle2d")
    write_synthetic_dataset(root / "data", 10, (48, 40), num_classes=2, in_channels=3, seed=5)
    run_workflow("train", "train", root, **TRAIN_2D)
    return root


def test_training_writes_checkpoints_best_model_and_curves(trained_2d):
    ckpt = load_checkpoint(latest_checkpoint(trained_2d / "models"))
    assert set(ckpt) == {"model", "ema", "optimizer", "lr_scheduler", "time_budget", "condition_warmup", "trainer"}
    assert ckpt["time_budget"]["elapsed_s"] > 0  # the training time so far, for a resumed budget
    assert ckpt["trainer"]["iteration"] == 2 * ckpt["trainer"]["epoch_length"]  # both epochs
    assert int(ckpt["ema"]["num_updates"]) == ckpt["trainer"]["iteration"]
    best = load_checkpoint(trained_2d / "models" / "model.pt")
    assert "diffusion_unet.stem.weight" in best  # a plain state dict the inference config loads
    log = pd.read_csv(trained_2d / "eval" / "training_log.csv")
    assert {"loss", "diffusion_loss", "anchor_loss", "x0_dice_loss"} <= set(log.columns)  # x0 Dice on by default
    assert (trained_2d / "eval" / "training_curves.png").is_file()
    # the loop's timing per epoch: every iteration and image of the run, at a positive rate
    timing = pd.read_csv(trained_2d / "eval" / "loop_timing.csv")
    assert timing["epoch"].tolist() == [1, 2] and timing["iterations"].sum() == ckpt["trainer"]["iteration"]
    assert timing["images"].sum() == TRAIN_2D["batch_size"] * ckpt["trainer"]["iteration"]
    assert (timing["images_per_s"] > 0).all() and timing["data_wait_fraction"].between(0, 1).all()
    # the learning rate stays at train.json's learning_rate (lr_floor 1: constant, the EMA weights do the averaging)
    np.testing.assert_allclose(timing["learning_rate"], [1e-4, 1e-4], rtol=1e-6)
    # the sampled result's Dice and the condition model's own (anchor) Dice, per validation run
    val_log = pd.read_csv(trained_2d / "eval" / "validation_log.csv")
    assert {"val_mean_dice", "val_anchor_dice"} <= set(val_log.columns) and len(val_log) == 2
    assert val_log[["val_mean_dice", "val_anchor_dice"]].stack().between(0, 1).all()


def test_inference_writes_maps_in_the_input_geometry(trained_2d):
    run_workflow("inference", "infer", trained_2d, **INFER_2D)
    out = trained_2d / "eval" / "inference"
    cases = json.loads((trained_2d / "data" / "datalist.json").read_text(encoding="utf-8"))["training"]
    fold0 = [c for c in cases if c["fold"] == 0]
    assert fold0
    for case in fold0:
        name = case["image"].split("/")[-1][: -len(".png")]
        source = np.array(Image.open(trained_2d / "data" / case["image"]))
        seg = np.array(Image.open(out / f"{name}_seg.png"))
        unc = np.array(Image.open(out / f"{name}_uncertainty.png"))
        assert seg.shape == source.shape[:2] == unc.shape  # original (H, W), not the 32x32 patch, not transposed
        assert set(np.unique(seg)) <= {0, 1}
        assert (out / f"{name}_overlay.png").is_file()
    assert pd.read_csv(out / "failed_cases.csv").empty


def test_evaluation_writes_per_case_metrics_and_summary(trained_2d):
    run_workflow("evaluate", "infer", trained_2d, **INFER_2D)
    out = trained_2d / "eval" / "evaluation"
    table = pd.read_csv(out / "metrics.csv")
    assert list(table.columns) == ["case", "class", "dice", "iou", "hd95"]
    assert len(table) == 2 and table["dice"].between(0, 1).all()
    assert "±" in (out / "metrics_summary.md").read_text(encoding="utf-8")


def test_cases_whose_files_share_a_name_keep_their_outputs_apart(trained_2d, tmp_path):
    """One folder per case with the same file names (KiTS' ``case_00000/imaging.nii.gz``): every case's label map,
    uncertainty map and overlay go to its own sub-folder and metrics.csv names each case by it, where they once
    overwrote one another under one name."""
    import shutil

    cases = json.loads((trained_2d / "data" / "datalist.json").read_text(encoding="utf-8"))["training"]
    fold0 = [c for c in cases if c["fold"] == 0]
    assert len(fold0) == 2
    layout = []
    for case in fold0:
        folder = tmp_path / "data" / "scans" / case["image"].split("/")[-1][: -len(".png")]
        folder.mkdir(parents=True)
        shutil.copy(trained_2d / "data" / case["image"], folder / "image.png")
        shutil.copy(trained_2d / "data" / case["label"], folder / "mask.png")
        layout.append({"image": f"scans/{folder.name}/image.png", "label": f"scans/{folder.name}/mask.png", "fold": 0})
    datalist = tmp_path / "data" / "datalist.json"
    datalist.write_text(json.dumps({"training": layout}), encoding="utf-8")
    settings = {**INFER_2D, "datalist": str(datalist), "dataset_dir": str(tmp_path / "data"),
                "ckpt_path": str(trained_2d / "models" / "model.pt")}
    for config, folder in (("evaluate", tmp_path / "evaluation"), ("inference", tmp_path / "inference")):
        run_workflow(config, "infer", trained_2d, output_dir=str(folder), **settings)
        names = sorted(p.parent.name for p in folder.glob("*/image_seg.png"))
        assert names == sorted(Path(c["image"]).parent.name for c in layout), list(folder.rglob("*"))
        for name in names:
            source = np.array(Image.open(tmp_path / "data" / "scans" / name / "image.png"))
            assert np.array(Image.open(folder / name / "image_seg.png")).shape == source.shape[:2]
            for kind in ("uncertainty", "overlay"):
                assert (folder / name / f"image_{kind}.png").is_file(), kind
        assert not list(folder.glob("image_*.png"))  # nothing left to be overwritten at the top
    table = pd.read_csv(tmp_path / "evaluation" / "metrics.csv")
    assert sorted(table["case"]) == [f"{name}/image" for name in names]


@pytest.mark.parametrize("config", ["inference", "evaluate"])
def test_sampler_options_reach_the_inferer(trained_2d, config):
    wf = workflow(config, "infer", trained_2d, **INFER_2D, sampler="ddim", round_x0=True, anchor_weight=0.3,
                  mirror_axes=[1, 0])
    sampler = wf.inferer.sampler
    assert (sampler.sampler, sampler.steps, sampler.ensemble) == ("ddim", 2, 2)
    assert sampler.round_x0 is True and sampler.anchor_weight == 0.3 and sampler.mirror_axes == (0, 1)
    default_wf = workflow(config, "infer", trained_2d, **INFER_2D)
    default = default_wf.inferer.sampler
    assert default.anchor_weight == 0.0 and default.mirror_axes == (0, 1)  # every spatial axis, as training flips
    assert default_wf.inferer.amp is False  # the tests' setting (TINY)
    # the bundle's own: bf16 where the device computes it natively (a CPU with AVX512-BF16 or AMX, a GPU with bf16
    # tensor cores)
    tiny_but_amp = {k: v for k, v in TINY.items() if k != "amp"}
    untouched = bundle_workflow(config, "infer", trained_2d, **tiny_but_amp, **INFER_2D)
    assert untouched.inferer.amp is bf16_is_fast(untouched.device)


def test_a_wider_condition_unet_trains_saves_and_evaluates(tmp_path):
    write_synthetic_dataset(tmp_path / "data", 6, (32, 32), num_classes=2, in_channels=3, seed=2)
    wide = {"condition_channels": [16, 32, 64]}  # TINY diffusion widths are 8, 16, 32
    run_workflow("train", "train", tmp_path, **{**TRAIN_2D, "max_epochs": 1}, **wide)
    weights = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert tuple(weights["semantic_proj.weight"].shape[:2]) == (32, 64)
    run_workflow("evaluate", "infer", tmp_path, **INFER_2D, **wide)
    assert pd.read_csv(tmp_path / "eval" / "evaluation" / "metrics.csv")["dice"].between(0, 1).all()


def test_x0_dice_weight_reaches_the_loss_and_its_term_is_logged(tmp_path):
    write_synthetic_dataset(tmp_path / "data", 6, (32, 32), num_classes=2, in_channels=3, seed=3)
    wf = run_workflow("train", "train", tmp_path, **{**TRAIN_2D, "max_epochs": 1, "val_interval": 5},
                      x0_dice_weight=0.5)
    assert wf.trainer.loss_function.x0_dice_weight == 0.5
    log = pd.read_csv(tmp_path / "eval" / "training_log.csv")
    assert log["x0_dice_loss"].between(0, 1).all() and len(log) == wf.trainer.state.iteration
    # the logged total is the sum of its terms (the paper's anchor weight is 1)
    expected = log["diffusion_loss"] + log["anchor_loss"] + 0.5 * log["x0_dice_loss"]
    assert np.allclose(log["loss"], expected, atol=1e-4)


def test_batch_inference_reports_a_corrupt_case_and_continues(trained_2d, tmp_path):
    good = sorted((trained_2d / "data" / "images").glob("*.png"))[:2]
    folder = tmp_path / "in"
    folder.mkdir()
    for p in good:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png at all")
    run_workflow("inference", "infer", trained_2d, input_dir=str(folder), output_dir=str(tmp_path / "out"), **INFER_2D)
    failed = pd.read_csv(tmp_path / "out" / "failed_cases.csv")
    assert len(failed) == 1 and failed["case"][0].endswith("broken.png")
    for p in good:
        assert (tmp_path / "out" / f"{p.stem}_seg.png").is_file()


@pytest.mark.parametrize("epoch", [{}, {"iterations_per_epoch": 3}, {"condition_warmup": 0.5},
                                   {"condition_warmup": 0.25, "iterations_per_epoch": 2}],
                         ids=["one-pass-epochs", "fixed-length-epochs", "warm-up-ends-at-the-resume",
                              "warm-up-ends-before-the-resume"])
def test_exact_resume(tmp_path, epoch):
    """2 epochs straight == a run stopped after epoch 1 (as if killed) and resumed: model, EMA and optimizer match.
    Also with nnU-Net-style fixed-length epochs (3 batches of 4 drawn from fewer training cases: cases repeat), and
    with a condition warm-up that ends where the run resumes (the EMA restart happens after the resume) or inside
    the first epoch (the checkpoint says it happened: no second restart)."""
    from ignite.engine import Events

    write_synthetic_dataset(tmp_path / "data", 6, (32, 32), seed=9)
    common = {**TRAIN_2D, "val_interval": 5, "dataset_dir": str(tmp_path / "data"), **epoch}
    run_workflow("train", "train", tmp_path / "straight", **common)

    interrupted = workflow("train", "train", tmp_path / "resumed", **common)
    trainer = interrupted.parser.get_parsed_content("train#trainer")
    # registered before the checkpoint saver, so the epoch-1 checkpoint is still written, then the run stops
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda engine: engine.terminate())
    interrupted.run()
    stopped = load_checkpoint(latest_checkpoint(tmp_path / "resumed" / "models"))["trainer"]
    assert stopped["iteration"] == stopped["epoch_length"]  # one epoch done
    if "iterations_per_epoch" in epoch:
        assert stopped["epoch_length"] == epoch["iterations_per_epoch"]
    run_workflow("train", "train", tmp_path / "resumed", **{**common, "resume": True})

    a = load_checkpoint(latest_checkpoint(tmp_path / "straight" / "models"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "resumed" / "models"))
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] > 0
    for part in ("model", "ema"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), (part, key)
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg"], b["optimizer"]["state"][0]["exp_avg"])
    assert a["lr_scheduler"] == b["lr_scheduler"]
    assert a["condition_warmup"] == b["condition_warmup"] == {"ended": "condition_warmup" in epoch}


def _chain(error: BaseException) -> str:
    """All messages of an exception and its causes (MONAI wraps config errors in RuntimeError)."""
    parts = []
    while error is not None:
        parts.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(parts)


def test_missing_file_stops_training_before_it_starts_naming_the_case(tmp_path):
    datalist = write_synthetic_dataset(tmp_path / "data", 6, (32, 32), seed=1)
    (tmp_path / "data" / "labels" / "case_0003.png").unlink()
    with pytest.raises(Exception) as error:
        run_workflow("train", "train", tmp_path, datalist=str(datalist), **TRAIN_2D)
    assert "case_0003: label file(s) do not exist" in _chain(error.value)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_label_values_outside_the_class_range_name_the_file(tmp_path):
    write_synthetic_dataset(tmp_path / "data", 4, (32, 32), seed=2)
    label = tmp_path / "data" / "labels" / "case_0001.png"
    Image.fromarray((np.array(Image.open(label)) * 255).astype(np.uint8)).save(label)
    with pytest.raises(Exception) as error:
        run_workflow("train", "train", tmp_path, **{**TRAIN_2D, "max_epochs": 1, "fold": None})
    assert re.search(r"case_0001\.png has values in \[0, 255\].*label_threshold", _chain(error.value))


def test_image_label_shape_mismatch_is_refused(tmp_path):
    write_synthetic_dataset(tmp_path / "data", 4, (32, 32), seed=3)
    Image.fromarray(np.zeros((20, 32), np.uint8)).save(tmp_path / "data" / "labels" / "case_0002.png")
    with pytest.raises(Exception) as error:
        run_workflow("train", "train", tmp_path, **TRAIN_2D)
    assert re.search(r"case_0002.*size", _chain(error.value))


def test_3d_nifti_train_and_sliding_window_inference_keep_the_affine(tmp_path):
    """2-channel (4D channel-last) volumes with anisotropic spacing and a rotated, shifted affine: outputs come
    back as 3D maps with the same affine and shape."""
    datalist = write_synthetic_dataset(tmp_path / "data", 4, (24, 20, 16), num_classes=3, in_channels=2, seed=4)
    affine = np.array([[-1.5, 0, 0, 10], [0, 0, 2.0, -5], [0, 1.0, 0, 3], [0, 0, 0, 1]])
    for f in (tmp_path / "data").rglob("*.nii.gz"):
        img = nib.load(f)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), f)
    settings = {"spatial_dims": 3, "in_channels": 2, "num_classes": 3, "patch_size": [16, 16, 16], "normalization": "zscore"}
    run_workflow("train", "train", tmp_path, datalist=str(datalist), batch_size=2, max_epochs=1, val_interval=1,
                 val_steps=2, **settings)
    run_workflow("inference", "infer", tmp_path, datalist=str(datalist), steps=2, ensemble=2, **settings)
    case = json.loads(datalist.read_text(encoding="utf-8"))["training"][0]
    source = nib.load(tmp_path / "data" / case["image"])
    name = case["image"].split("/")[-1][: -len(".nii.gz")]
    for suffix in ("seg", "uncertainty"):
        out = nib.load(tmp_path / "eval" / "inference" / f"{name}_{suffix}.nii.gz")
        assert out.shape == source.shape[:3]
        np.testing.assert_allclose(out.affine, source.affine, atol=1e-4)
    seg = np.asarray(nib.load(tmp_path / "eval" / "inference" / f"{name}_seg.nii.gz").dataobj)
    assert seg.min() >= 0 and seg.max() <= 2


def test_literal_bundle_run_command_trains(tmp_path):
    """The command users type: python -m monai.bundle run training --config_file bundle/configs/train.json."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(CONFIGS / "train.json"),
           "--bundle_root", str(tmp_path), "--max_epochs", "1", "--channels", "[8,16,32]", "--patch_size", "[32,32]",
           "--num_workers", "0", "--val_interval", "1", "--val_steps", "2"]
    out = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "models" / "model.pt").is_file()
    assert latest_checkpoint(tmp_path / "models") is not None


def test_amp_flag_from_the_command_line_is_parsed_not_truthy(tmp_path):
    """--amp true trains under bf16 autocast; --resume false (a string on the CLI) must not resume."""
    write_synthetic_dataset(tmp_path / "data", 6, (32, 32), seed=6)
    run_workflow("train", "train", tmp_path, **{**TRAIN_2D, "max_epochs": 1, "amp": "true", "val_interval": 5})
    first = load_checkpoint(latest_checkpoint(tmp_path / "models"))
    assert all(torch.isfinite(v).all() for v in first["model"].values())
    run_workflow("train", "train", tmp_path, **{**TRAIN_2D, "max_epochs": 1, "resume": "false", "val_interval": 5})
    again = load_checkpoint(latest_checkpoint(tmp_path / "models"))
    assert again["trainer"]["iteration"] == first["trainer"]["iteration"]  # started over, did not continue


def test_inference_reads_mha_nrrd_and_dicom_series_and_keeps_their_geometry(tmp_path):
    """ITK-read inputs (MetaImage, NRRD, a DICOM series folder) come back as label maps on the same grid."""
    import SimpleITK as sitk

    from tests.helpers import dicom_series

    datalist = write_synthetic_dataset(tmp_path / "data", 4, (16, 16, 16), num_classes=2, in_channels=1, seed=7)
    settings = {"spatial_dims": 3, "in_channels": 1, "num_classes": 2, "patch_size": [16, 16, 16],
                "normalization": "zscore"}
    run_workflow("train", "train", tmp_path, datalist=str(datalist), batch_size=2, max_epochs=1, val_interval=1,
                 val_steps=1, **settings)
    folder = tmp_path / "in"
    folder.mkdir()
    volume = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(12, 16, 20)).astype(np.float32))
    volume.SetSpacing((0.8, 1.2, 2.5))
    volume.SetOrigin((4.0, -3.0, 7.0))
    sitk.WriteImage(volume, str(folder / "scan_a.mha"))
    sitk.WriteImage(volume, str(folder / "scan_b.nrrd"))
    dicom_series(folder / "series_c", nx=20, ny=16, nz=6)
    run_workflow("inference", "infer", tmp_path, input_dir=str(folder), output_dir=str(tmp_path / "out"), steps=1,
                 ensemble=1, **settings)
    assert pd.read_csv(tmp_path / "out" / "failed_cases.csv").empty
    for name, source in (("scan_a", folder / "scan_a.mha"), ("scan_b", folder / "scan_b.nrrd"),
                         ("series_c", None)):
        seg = sitk.ReadImage(str(tmp_path / "out" / f"{name}_seg.nii.gz"))
        if source is None:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder / "series_c")))
            ref = reader.Execute()
        else:
            ref = sitk.ReadImage(str(source))
        assert seg.GetSize() == ref.GetSize(), name
        np.testing.assert_allclose(seg.GetSpacing(), ref.GetSpacing(), atol=1e-4)
        np.testing.assert_allclose(seg.GetOrigin(), ref.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(seg.GetDirection(), ref.GetDirection(), atol=1e-4)


def test_time_budget_stops_after_an_epoch_and_keeps_its_checkpoint(tmp_path):
    write_synthetic_dataset(tmp_path / "data", 6, (32, 32), seed=8)
    run_workflow("train", "train", tmp_path, **{**TRAIN_2D, "max_epochs": 50, "val_interval": 100,
                                               "time_budget_minutes": 1e-6})
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "models"))
    assert ckpt["trainer"]["iteration"] == ckpt["trainer"]["epoch_length"]  # stopped after epoch 1 of 50


def test_lr_floor_is_where_the_rate_ends(tmp_path):
    """``lr_floor`` is the fraction of ``learning_rate`` the cosine reaches at the end of the run (1, the default:
    constant); the rate anneals per iteration over max_epochs, so it is the cosine's midpoint after epoch 1 of 2."""
    write_synthetic_dataset(tmp_path / "data", 6, (32, 32), seed=8)
    run_workflow("train", "train", tmp_path, **{**TRAIN_2D, "val_interval": 100, "learning_rate": 1e-3,
                                               "lr_floor": 0.25})
    timing = pd.read_csv(tmp_path / "eval" / "loop_timing.csv")
    np.testing.assert_allclose(timing["learning_rate"], [1e-3 * (0.25 + 0.75 * 0.5), 1e-3 * 0.25], rtol=1e-6)


def test_a_resumed_time_budget_spends_what_is_left_and_the_rate_anneals_over_it(tmp_path):
    """The checkpoint carries the training time used: resumed with the same budget, a run that had used it up
    stops after one more epoch (before, the budget started anew and the run went on to max_epochs), at the rate's
    floor, since the learning rate anneals over the budget rather than over the (large) max_epochs."""
    write_synthetic_dataset(tmp_path / "data", 6, (32, 32), seed=8)
    common = {**TRAIN_2D, "max_epochs": 50, "val_interval": 100, "learning_rate": 1e-3, "lr_floor": 0.05}
    # a budget of a few epochs: the first run must stop on it, not on max_epochs
    run_workflow("train", "train", tmp_path, **{**common, "time_budget_minutes": 0.02})
    first = load_checkpoint(latest_checkpoint(tmp_path / "models"))
    epochs = first["trainer"]["iteration"] // first["trainer"]["epoch_length"]
    assert 1 <= epochs < 50 and first["time_budget"]["elapsed_s"] >= 0.02 * 60
    timing = pd.read_csv(tmp_path / "eval" / "loop_timing.csv")
    assert timing["learning_rate"].is_monotonic_decreasing and timing["learning_rate"].iloc[0] < 1e-3
    run_workflow("train", "train", tmp_path, **{**common, "time_budget_minutes": 0.02, "resume": True})
    resumed = load_checkpoint(latest_checkpoint(tmp_path / "models"))
    assert resumed["trainer"]["iteration"] == (epochs + 1) * first["trainer"]["epoch_length"]
    assert resumed["time_budget"]["elapsed_s"] > first["time_budget"]["elapsed_s"]
    timing = pd.read_csv(tmp_path / "eval" / "loop_timing.csv")
    assert timing["learning_rate"].iloc[-1] == pytest.approx(0.05 * 1e-3)  # the budget was used up


def test_resume_goes_on_from_a_checkpoint_without_the_time_budget(tmp_path, capfd):
    """Checkpoints of bundle versions before the budget was saved lack ``time_budget`` (and, before 0.11.0,
    ``condition_warmup``): resuming skips them (with a warning) rather than failing."""
    write_synthetic_dataset(tmp_path / "data", 6, (32, 32), seed=8)
    common = {**TRAIN_2D, "max_epochs": 1, "val_interval": 100}
    run_workflow("train", "train", tmp_path, **common)
    path = latest_checkpoint(tmp_path / "models")
    old = load_checkpoint(path)
    del old["time_budget"], old["condition_warmup"]
    torch.save(old, path)
    capfd.readouterr()
    run_workflow("train", "train", tmp_path, **{**common, "max_epochs": 2, "resume": True})
    # the bundle's logging.conf writes to the console
    assert "has no ['time_budget', 'condition_warmup']" in "".join(capfd.readouterr())
    trainer = load_checkpoint(latest_checkpoint(tmp_path / "models"))["trainer"]
    assert trainer["iteration"] == 2 * trainer["epoch_length"]


def test_torchrun_command_layers_the_plan_over_the_bundle(tmp_path):
    from medsegdiff_bundle.engine.launch import torchrun_command

    cmd = torchrun_command(tmp_path, tmp_path / "bundle_overrides.json", 2, max_epochs=3, channels=[8, 16])
    configs = json.loads(cmd[cmd.index("--config_file") + 1])
    assert [c.split("/")[-1] for c in configs] == ["train.json", "multi_gpu_train.json", "bundle_overrides.json"]
    assert "--nproc_per_node=2" in cmd and cmd[cmd.index("--channels") + 1] == "[8, 16]"
    single = torchrun_command(tmp_path, None, 1)
    assert [c.split("/")[-1] for c in json.loads(single[single.index("--config_file") + 1])] == ["train.json"]


def test_gradient_accumulation_steps_the_optimizer_every_n_iterations_and_at_epoch_end(tmp_path):
    write_synthetic_dataset(tmp_path / "data", 12, (32, 32), seed=10)  # 9-10 training cases -> 5 iterations of 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_workflow("train", "train", tmp_path, **{**TRAIN_2D, "batch_size": 2, "grad_accum": 2, "max_epochs": 2,
                                                   "val_interval": 100})
    # the rate steps every iteration, the optimiser every second: no warning of a misordered schedule for that
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)], [str(w.message) for w in caught]
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "models"))
    per_epoch = ckpt["trainer"]["epoch_length"]
    optimizer_steps = int(ckpt["optimizer"]["state"][0]["step"])
    assert optimizer_steps == 2 * math.ceil(per_epoch / 2)  # a flush at each epoch end
    assert optimizer_steps < ckpt["trainer"]["iteration"]


def test_compile_mode_reaches_the_training_iteration_and_every_sampling_inferer(tmp_path):
    write_synthetic_dataset(tmp_path / "data", 4, (32, 32), seed=13)
    train = workflow("train", "train", tmp_path, **TRAIN_2D, compile=True, compile_mode="reduce-overhead")
    with pytest.warns(UserWarning, match="without CUDA graphs"):  # the training step compiles the same, graphless
        assert train.parser.get_parsed_content("train#iteration").compile_mode == "default"
    assert train.parser.get_parsed_content("validate#inferer").compile_mode == "reduce-overhead"
    for config in ("inference", "evaluate"):
        wf = workflow(config, "infer", tmp_path, **INFER_2D, compile_mode="reduce-overhead")
        assert wf.parser.get_parsed_content("inferer").compile_mode == "reduce-overhead", config
    with pytest.raises(RuntimeError) as err:  # MONAI names the component; the cause names the key
        workflow("inference", "infer", tmp_path, **INFER_2D, compile_mode="fast").parser.get_parsed_content("inferer")
    assert "compile_mode must be one of" in str(err.value.__cause__) and "'fast'" in str(err.value.__cause__)


def test_iterations_per_epoch_is_checked():
    from medsegdiff_bundle.engine import samples_per_epoch

    assert samples_per_epoch(None, 8) is None and samples_per_epoch(250, 8) == 2000
    for bad in (0, -3, 2.5, True, "100"):
        with pytest.raises(ValueError, match="iterations_per_epoch"):
            samples_per_epoch(bad, 8)


def test_the_training_loop_is_configured_not_to_wait_for_the_gpu(tmp_path):
    """Pinned batches copied without blocking (CUDA), the console loss read every log_interval iterations, and the
    iteration's output left as it is: MONAI's trainers decollate it by default, which reads every scalar loss back
    with ``.item()`` (a wait for the GPU, four times per step) and splits the batch and its metadata per case (host
    time). The H100 bundle loop trained at half the bare step's images per second with it."""
    from ignite.engine import Events
    from monai.handlers import StatsHandler

    write_synthetic_dataset(tmp_path / "data", 4, (32, 32), seed=13)
    wf = workflow("train", "train", tmp_path, **{**TRAIN_2D, "max_epochs": 1, "val_interval": 100}, log_interval=4)
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.non_blocking is True
    assert wf.parser.get_parsed_content("train#dataloader").pin_memory is torch.cuda.is_available()
    stats = [h for h in wf.parser.get_parsed_content("train#handlers") if isinstance(h, StatsHandler)]
    keep = stats[0].iteration_log
    assert [i for i in range(1, 13) if keep(None, i)] == [4, 8, 12]
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append((e.state.output, e.state.batch)))
    wf.run()
    assert seen
    for output, batch in seen:  # still on the device, as the iteration left them; the batch still collated
        assert isinstance(output, dict) and isinstance(batch, dict)
        assert all(isinstance(output[k], torch.Tensor) for k in ("loss", "diffusion_loss", "anchor_loss"))
        assert batch["image"].shape[0] == output["image"].shape[0] >= 1


@pytest.mark.usefixtures("fresh_dynamo")
def test_channels_last_and_compile_keep_checkpoints_those_of_the_plain_network(tmp_path):
    """--channels_last true --compile true (the cheap "aot_eager" backend here; "inductor" by default) trains, saves
    plain state dicts (no "_orig_mod." keys) that load into an unconverted network, resumes, and evaluates to the
    metrics of the default path."""
    from medsegdiff_bundle.networks import MedSegDiffV2

    write_synthetic_dataset(tmp_path / "data", 6, (32, 32), seed=11)
    fast = {"channels_last": True, "compile": True, "compile_backend": "aot_eager"}
    run_workflow("train", "train", tmp_path, **{**TRAIN_2D, "max_epochs": 1, **fast})
    plain = MedSegDiffV2(2, 3, 2, channels=(8, 16, 32))
    keys = set(plain.state_dict())
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "models"))
    assert set(ckpt["model"]) == keys
    assert set(ckpt["ema"]) == {"num_updates"} | {f"module.{k}" for k in keys}
    best = load_checkpoint(tmp_path / "models" / "model.pt")
    assert set(best) == keys
    plain.load_state_dict(ckpt["model"])  # strict: the checkpoint fits a network that was never converted
    run_workflow("train", "train", tmp_path, **{**TRAIN_2D, "max_epochs": 2, "resume": True, "val_interval": 5, **fast})
    resumed = load_checkpoint(latest_checkpoint(tmp_path / "models"))
    assert resumed["trainer"]["iteration"] == 2 * ckpt["trainer"]["iteration"] and set(resumed["model"]) == keys

    run_workflow("evaluate", "infer", tmp_path, **INFER_2D, output_dir=str(tmp_path / "default"))
    run_workflow("evaluate", "infer", tmp_path, **INFER_2D, output_dir=str(tmp_path / "fast"), **fast)
    default = pd.read_csv(tmp_path / "default" / "metrics.csv")
    np.testing.assert_allclose(pd.read_csv(tmp_path / "fast" / "metrics.csv")["dice"], default["dice"], atol=1e-3)


def test_the_dataset_cache_trains_the_same_weights_and_disk_caches_under_bundle_root(tmp_path):
    """Caching the deterministic pre-processing (2D default: in memory) changes how fast batches come, not what they
    are: the same weights after an epoch with "none", "memory" and "disk"."""
    write_synthetic_dataset(tmp_path / "data", 6, (40, 36), seed=21)
    weights = {}
    for cache in ("none", "memory", "disk"):
        root = tmp_path / cache
        root.mkdir()
        (root / "data").symlink_to(tmp_path / "data")
        wf = run_workflow("train", "train", root, **{**TRAIN_2D, "max_epochs": 1, "val_interval": 100},
                          dataset_cache=cache)
        assert type(wf.parser.get_parsed_content("train#dataset")).__name__ == {
            "none": "Dataset", "memory": "CacheDataset", "disk": "_PersistentDataset"}[cache]
        weights[cache] = load_checkpoint(latest_checkpoint(root / "models"))["model"]
    assert len(list((tmp_path / "disk" / "cache").glob("*/*.pt"))) > 0
    for cache in ("memory", "disk"):
        for name, value in weights["none"].items():
            assert torch.equal(value, weights[cache][name]), (cache, name)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_the_augmentation_option_reaches_the_training_pipeline(tmp_path, spatial_dims):
    """train.json's ``augmentation`` picks the training pipeline's random part (nnU-Net's here) and trains."""
    size = [32, 32] if spatial_dims == 2 else [16, 16, 16]
    write_synthetic_dataset(tmp_path / "data", 4, (40, 36) if spatial_dims == 2 else (20, 18, 16), seed=22)
    dims = {} if spatial_dims == 2 else {"spatial_dims": 3, "in_channels": 3, "normalization": "zscore"}
    one_epoch = {**TRAIN_2D, "max_epochs": 1, "val_interval": 100, "patch_size": size}
    wf = run_workflow("train", "train", tmp_path, **one_epoch, augmentation="nnunet", **dims)
    names = {type(t).__name__ for t in wf.parser.get_parsed_content("train#preprocessing").transforms}
    assert {"RandGaussianNoised", "RandAdjustContrastd", "RandSimulateLowResolutiond"} <= names
    assert "RandShiftIntensityd" not in names  # default's
    trainer = load_checkpoint(latest_checkpoint(tmp_path / "models"))["trainer"]
    assert trainer["iteration"] == trainer["epoch_length"] > 0
