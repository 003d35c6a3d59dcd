"""Smoke test of ``benchmarks/quality.py`` on the real Kvasir-SEG copy (skipped when it is absent): the script
runs end to end on CPU, writes the result JSON, keeps the committed split reproducible and the test cases out of
training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.bundle_utils import REPO, SHARED_DATA

pytestmark = pytest.mark.slow

KVASIR = SHARED_DATA / "Kvasir-SEG"
SCRIPT = REPO / "benchmarks" / "quality.py"
SPLIT = REPO / "benchmarks" / "splits" / "kvasir_seg_split.json"


def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_in_memory_diagnostics_sample_with_the_test_evaluations_mirroring():
    """The anchor-weight selection and the trajectory use the sampler the test evaluation uses, mirroring included."""
    quality = _load_script()
    assert quality.evaluation_sampler(quality.parse_args([])).mirror_axes == (0, 1)
    assert quality.evaluation_sampler(quality.parse_args(["--no-mirror"])).mirror_axes == ()


def test_the_training_stamp_ignores_the_shared_precision_but_not_the_settings(tmp_path):
    """bf16 or fp32 is the device's choice for both models of a run (recorded in the result), not a property of the
    trained model: a model trained on a GPU in bf16 is resumed or scored on a CPU in fp32. Stamps written before the
    precision was left out (the smoke runs recorded amp false) still match."""
    quality = _load_script()
    quality.check_training_settings(tmp_path, {"lr": 1e-3, "amp": True, "num_workers": 8})
    assert json.loads((tmp_path / "training.json").read_text(encoding="utf-8")) == {"lr": 1e-3}
    quality.check_training_settings(tmp_path, {"lr": 1e-3, "amp": False, "num_workers": 1})
    (tmp_path / "training.json").write_text(json.dumps({"lr": 1e-3, "amp": False}), encoding="utf-8")
    quality.check_training_settings(tmp_path, {"lr": 1e-3, "amp": True})
    with pytest.raises(SystemExit, match="'lr'"):
        quality.check_training_settings(tmp_path, {"lr": 2e-3, "amp": False})


def test_a_model_resumes_only_with_the_augmentation_it_was_trained_with(tmp_path, capsys):
    """--augmentation is part of both models' training stamps: a folder trained with one is not resumed or scored
    under another, and a stamp written before the option (none recorded) stands for the bundle's default."""
    quality = _load_script()
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    (old / "training.json").write_text(json.dumps({"lr": 1e-3}), encoding="utf-8")
    quality.check_training_settings(old, {"lr": 1e-3, "augmentation": "default"})
    with pytest.raises(SystemExit, match=r"'augmentation': \{'trained with': 'default', 'asked for': 'nnunet'\}"):
        quality.check_training_settings(old, {"lr": 1e-3, "augmentation": "nnunet"})
    quality.check_training_settings(new, {"lr": 1e-3, "augmentation": "nnunet"})
    assert json.loads((new / "training.json").read_text(encoding="utf-8"))["augmentation"] == "nnunet"
    with pytest.raises(SystemExit, match=r"'augmentation': \{'trained with': 'nnunet', 'asked for': 'default'\}"):
        quality.check_training_settings(new, {"lr": 1e-3, "augmentation": "default"})
    assert quality.parse_args([]).augmentation == "default"
    with pytest.raises(SystemExit):
        quality.parse_args(["--augmentation", "heavy"])
    assert "--augmentation: invalid choice: 'heavy'" in capsys.readouterr().err


def test_precision_is_the_devices_unless_asked(monkeypatch):
    """--precision auto follows bf16_is_fast (fp32 in --smoke); bf16 and fp32 are taken as asked, smoke or not."""
    import torch

    from medsegdiff_bundle.engine import fastpath

    quality = _load_script()
    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(fastpath, "bf16_is_fast", lambda device, native=native: native)
        assert quality.uses_bf16(quality.parse_args([]), cpu) is native
        assert quality.uses_bf16(quality.parse_args(["--smoke"]), cpu) is False
        for smoke in ([], ["--smoke"]):
            assert quality.uses_bf16(quality.parse_args(["--precision", "bf16", *smoke]), cpu) is True
            assert quality.uses_bf16(quality.parse_args(["--precision", "fp32", *smoke]), cpu) is False


def test_loop_timing_reports_the_warm_up_and_joint_epochs_apart(tmp_path):
    """Epochs 1-3 are warm-up (no diffusion_loss), 4 holds the switch, 5-6 are joint; epoch 1 is left out as the
    loader's start."""
    import pandas as pd

    quality = _load_script()
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    seconds = [9.0, 2.0, 2.0, 3.0, 4.0, 4.0]
    pd.DataFrame({"epoch": range(1, 7), "images": [16] * 6, "seconds": seconds, "data_wait_seconds": [0.5] * 6}
                 ).to_csv(eval_dir / "loop_timing.csv", index=False)
    warm = [True] * 6 + [True, False] + [False] * 4  # two iterations per epoch
    pd.DataFrame({"iteration": range(1, 13), "epoch": [e for e in range(1, 7) for _ in (0, 1)],
                  "diffusion_loss": [float("nan") if w else 0.3 for w in warm]}
                 ).to_csv(eval_dir / "training_log.csv", index=False)
    loop = quality.loop_timing(tmp_path)
    assert loop["condition_warmup_iterations"] == 7
    assert loop["warmup_images_per_s"] == 32 / 4.0  # epochs 2 and 3
    assert loop["joint_images_per_s"] == 32 / 8.0  # epochs 5 and 6
    assert loop["images_per_s"] == 80 / 15.0
    (eval_dir / "training_log.csv").write_text("iteration,epoch,diffusion_loss\n1,1,0.3\n", encoding="utf-8")
    assert "condition_warmup_iterations" not in quality.loop_timing(tmp_path)


def test_split_file_is_names_only_and_follows_its_rule():
    doc = json.loads(SPLIT.read_text(encoding="utf-8"))
    assert {"rule", "test_ids", "num_test", "num_cases"} <= set(doc)
    assert len(doc["test_ids"]) == doc["num_test"] == len(set(doc["test_ids"]))
    assert all("/" not in i and "." not in i for i in doc["test_ids"])  # file stems, no paths or data
    if (KVASIR / "images").is_dir():
        quality = _load_script()
        ids = quality.case_ids(KVASIR)
        assert len(ids) == doc["num_cases"]
        assert quality.compute_split(ids)["test"] == doc["test_ids"]
        # the rule itself, independently of the script: sorted ids, every 5th one from the first
        assert sorted(ids)[::5] == doc["test_ids"]


@pytest.mark.skipif(not (KVASIR / "images").is_dir(), reason="Kvasir-SEG not in ../shared/data")
def test_quality_benchmark_smoke(tmp_path):
    start = time.monotonic()
    # the reruns resume it; the post-processing choice is off by default, and it is tested here
    SAME_TRAINING = ["--smoke", "--output", str(tmp_path), "--iterations-per-epoch", "2", "--postprocessing", "select"]

    def run_script(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(SCRIPT), *SAME_TRAINING, *extra], cwd=REPO, capture_output=True,
                              text=True, encoding="utf-8", errors="replace", timeout=600)
    proc = run_script()
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = list(tmp_path.glob("quality_*.json"))
    assert len(results) == 1, list(tmp_path.iterdir())
    res = json.loads(results[0].read_text(encoding="utf-8"))
    for key in ("device", "dice_medsegdiff", "dice_baseline", "iou_medsegdiff", "iou_baseline", "hd95_medsegdiff",
                "hd95_baseline", "train_minutes", "split", "sampler", "steps", "ensemble"):
        assert key in res, key
    for key in ("dice_medsegdiff", "dice_baseline", "iou_medsegdiff", "iou_baseline"):
        assert 0.0 <= res[key] <= 1.0, (key, res[key])
    assert res["steps"] == 2 and res["ensemble"] == 2 and res["split"]["num_test"] == 4
    assert "partial" not in res  # the early write, made before post-processing, was replaced by the complete one
    assert res["amp_bf16"] is False  # the smoke run trains and samples both models in fp32
    assert res["split"]["file"] == "benchmarks/splits/kvasir_seg_split.json" and res["split"]["rule"]
    assert res["medsegdiff"]["cases"] == 4 and res["baseline"]["cases"] == 4
    # the per-case pairing: same cases, so its mean is the difference of the two means
    gap = res["dice_minus_baseline"]["medsegdiff"]
    assert gap["cases"] == 4 and gap["cases_higher"] + gap["cases_lower"] <= 4
    assert gap["mean"] == pytest.approx(res["dice_medsegdiff"] - res["dice_baseline"], abs=1e-9)
    # each model's per-case Dice travels in the result file (sessions pair their runs from it): the same 4 test
    # cases, whose mean is the model's Dice and whose differences are the pairing's
    msd_cases, base_cases = res["medsegdiff"]["dice_per_case"], res["baseline"]["dice_per_case"]
    assert set(msd_cases) == set(base_cases) and len(msd_cases) == 4
    assert sum(msd_cases.values()) / 4 == pytest.approx(res["dice_medsegdiff"], abs=1e-5)
    assert sum(base_cases.values()) / 4 == pytest.approx(res["dice_baseline"], abs=1e-5)
    assert sum(msd_cases[c] > base_cases[c] for c in msd_cases) == gap["cases_higher"]
    # nnU-Net's post-processing, each model's own, chosen on the 2 validation cases and scored on the 4 test cases
    # from their candidate tables; the validation cases are kept out of both models' training
    pp = res["postprocessing"]
    for key, raw in (("medsegdiff", res["dice_medsegdiff"]), ("baseline", res["dice_baseline"])):
        assert pp[key]["validation"]["cases"] == 2 and len(pp[key]["dice_per_case"]) == 4
        assert pp[key]["dice"] == pytest.approx(raw + pp[key]["minus_raw"]["mean"], abs=1e-5)
        if not pp[key]["steps"]:
            assert pp[key]["dice"] == pytest.approx(raw, abs=1e-6)
        assert res[f"dice_{key}_postprocessed"] == pp[key]["dice"]
    # (paired from the per-case values, which the result file rounds to 5 decimals)
    assert pp["medsegdiff_minus_baseline"]["mean"] == pytest.approx(pp["medsegdiff"]["dice"] - pp["baseline"]["dice"],
                                                                    abs=1e-5)
    plan = json.loads((tmp_path / "medsegdiff" / "eval" / "evaluation_mirror_validation" / "postprocessing.json")
                      .read_text(encoding="utf-8"))
    assert plan["steps"] == pp["medsegdiff"]["steps"]  # the bundle's own choice, as a user's evaluate.json makes it
    assert json.loads((tmp_path / "dynunet" / "training.json").read_text(encoding="utf-8"))["num_cases"] == 10
    # fixed-length epochs reached the bundle (12 training cases at batch 4 would be 3 batches per pass)
    from medsegdiff_bundle.engine import latest_checkpoint, load_checkpoint

    assert load_checkpoint(latest_checkpoint(tmp_path / "medsegdiff" / "models"))["trainer"]["epoch_length"] == 2
    # the bundle loop's speed and its wait for the loader, from the run's loop_timing.csv
    loop = res["training_loop_medsegdiff"]
    assert loop["epochs"] >= 1 and loop["images_per_s"] > 0 and 0.0 <= loop["data_wait_fraction"] <= 1.0

    # the test cases never reach training: disjoint from the training datalist, and all from the committed split
    split_ids = set(json.loads(SPLIT.read_text(encoding="utf-8"))["test_ids"])
    train = json.loads((tmp_path / "datalist_train.json").read_text(encoding="utf-8"))["training"]
    test = json.loads((tmp_path / "datalist_test.json").read_text(encoding="utf-8"))["training"]
    train_ids = {Path(c["image"]).stem for c in train}
    test_ids = {Path(c["image"]).stem for c in test}
    assert len(train_ids) == 12 and len(test_ids) == 4
    assert not train_ids & test_ids
    assert test_ids <= split_ids and not train_ids & split_ids
    assert all(Path(c["image"]).is_absolute() for c in train + test)

    # a rerun is resumable: everything is found done and nothing retrains; it adds the per-step trajectory
    proc2 = run_script("--trajectory", "3")
    assert proc2.returncode == 0, proc2.stdout[-4000:] + proc2.stderr[-4000:]
    res2 = json.loads(results[0].read_text(encoding="utf-8"))
    assert res2["dice_medsegdiff"] == res["dice_medsegdiff"] and res2["dice_baseline"] == res["dice_baseline"]
    assert res2["postprocessing"] == res["postprocessing"]
    assert "Epoch:" not in proc2.stdout + proc2.stderr and "dynunet epoch" not in proc2.stdout
    traj = res2["trajectory"]
    assert traj["cases"] == 3 and len(traj["dice_per_step"]) == res2["steps"]
    for key in ("anchor_dice", "first_step_dice", "best_step_dice", "final_dice"):
        assert 0.0 <= traj[key] <= 1.0, (key, traj[key])
    assert traj["best_step_dice"] == pytest.approx(max(traj["dice_per_step"]), abs=1e-4)
    assert (tmp_path / "medsegdiff" / "eval" / "trajectory.png").is_file()
    print(f"smoke run: {elapsed:.1f} s")

    # both models mirror at test time by default; without it, evaluations of their own from the same trained
    # models (nothing retrains)
    assert res["mirror_axes"] == [0, 1]
    msd_eval = tmp_path / "medsegdiff" / "eval"
    assert json.loads((msd_eval / "evaluation_mirror" / "sampling.json").read_text(encoding="utf-8"))[
        "mirror_axes"] == [0, 1]
    assert Path(res["medsegdiff"]["metrics_csv"]) == msd_eval / "evaluation_mirror" / "metrics.csv"
    assert Path(res["baseline"]["metrics_csv"]) == tmp_path / "dynunet" / "mirror" / "metrics.csv"
    proc_m = run_script("--no-mirror")
    assert proc_m.returncode == 0, proc_m.stdout[-4000:] + proc_m.stderr[-4000:]
    res_m = json.loads(results[0].read_text(encoding="utf-8"))
    assert "Epoch:" not in proc_m.stdout + proc_m.stderr and "dynunet epoch" not in proc_m.stdout
    assert res_m["mirror_axes"] == [] and res_m["medsegdiff"]["cases"] == 4 and res_m["baseline"]["cases"] == 4
    assert json.loads((msd_eval / "evaluation" / "sampling.json").read_text(encoding="utf-8"))["mirror_axes"] == []
    assert Path(res_m["baseline"]["metrics_csv"]) == tmp_path / "dynunet" / "metrics.csv"

    # a third rerun selects the anchor blend on the validation fold and evaluates the test cases with it
    proc3 = run_script("--anchor-weight", "select", "--skip-baseline")
    assert proc3.returncode == 0, proc3.stdout[-4000:] + proc3.stderr[-4000:]
    res3 = json.loads(results[0].read_text(encoding="utf-8"))
    sel = res3["anchor_weight_selection"]
    assert set(sel["validation_dice"]) == {"0.0", "0.25", "0.5", "0.75", "1.0"}
    # the rule on the unrounded sweep (the JSON rounds to 4 decimals, which can make near-ties look like ties)
    import pandas as pd

    sweep = pd.read_csv(tmp_path / "medsegdiff" / "eval" / "anchor_weight_sweep_mirror.csv")
    assert sel["anchor_weight"] == sweep.loc[sweep["dice"] == sweep["dice"].max(), "anchor_weight"].min()
    assert all(round(float(d), 4) == sel["validation_dice"][str(w)] for w, d in zip(sweep["anchor_weight"], sweep["dice"]))
    assert res3["anchor_weight"] == sel["anchor_weight"] and "validation fold (2 cases" in sel["selected_on"]
    assert (tmp_path / "medsegdiff" / "eval" / "anchor_weight_sweep_mirror.csv").is_file()
    if sel["anchor_weight"] > 0:
        blend = f"evaluation_mirror_anchor{sel['anchor_weight']:g}"
        assert (tmp_path / "medsegdiff" / "eval" / blend / "metrics.csv").is_file()
        # the unblended evaluation is kept beside it (found done, not rerun)
        assert res3["ensemble_only"]["dice"] == res["dice_medsegdiff"]
    else:
        assert res3["dice_medsegdiff"] == res["dice_medsegdiff"] and "ensemble_only" not in res3
    # --skip-baseline: no pairing against a baseline this run did not score
    assert "dice_minus_baseline" not in res3

    # other sampler settings are evaluated again, not served from the finished evaluation of the first run
    stamp = tmp_path / "medsegdiff" / "eval" / "evaluation_mirror" / "sampling.json"
    assert json.loads(stamp.read_text(encoding="utf-8"))["sampler"] == "dpmpp"
    proc4 = run_script("--sampler", "ddim", "--skip-baseline")
    assert proc4.returncode == 0, proc4.stdout[-4000:] + proc4.stderr[-4000:]
    assert json.loads(stamp.read_text(encoding="utf-8"))["sampler"] == "ddim"
    assert "SupervisedEvaluator" in proc4.stdout + proc4.stderr  # sampled again
    assert json.loads(results[0].read_text(encoding="utf-8"))["sampler"] == "ddim"

    # ablations at the same budget: the full variant is the main model (not retrained), the others train in folders
    # of their own without the switched-off modules, and with a blend each is also scored by its ensemble alone
    proc6 = run_script("--sampler", "ddim", "--skip-baseline", "--anchor-weight", "0.5",
                       "--ablations", "none,usa+ssformer")
    assert proc6.returncode == 0, proc6.stdout[-4000:] + proc6.stderr[-4000:]
    res6 = json.loads(results[0].read_text(encoding="utf-8"))
    full, none = res6["ablations"]["usa+ssformer"], res6["ablations"]["none"]
    assert full["dice"] == res6["dice_medsegdiff"] and full["iterations"] == res["iterations_medsegdiff"] > 0
    assert full["ensemble_only"]["dice"] == res6["ensemble_only"]["dice"]
    assert (none["anchor"], none["semantic"]) == ("none", "none") and none["iterations"] > 0
    assert 0.0 <= none["dice"] <= 1.0 and 0.0 <= none["ensemble_only"]["dice"] <= 1.0
    import torch

    def weight_names(folder):
        return torch.load(tmp_path / folder / "models" / "final_ema.pt", weights_only=True).keys()

    assert not any(k.startswith(("anchor.", "ssformer.")) for k in weight_names("ablation_none"))
    assert any(k.startswith("ssformer.") for k in weight_names("medsegdiff"))
    assert not (tmp_path / "ablation_usa-ssformer").exists()
    assert full["dice_minus_main_model"]["mean"] == 0.0 and full["dice_minus_main_model"]["cases"] == 4
    assert none["dice_minus_main_model"]["mean"] == pytest.approx(none["dice"] - full["dice"], abs=1e-9)
    assert none["ensemble_only"]["dice_minus_main_model"]["mean"] == pytest.approx(
        none["ensemble_only"]["dice"] - full["ensemble_only"]["dice"], abs=1e-9)
    # the condition UNet's own segmentation, scored apart from the samples (one member, one step)
    assert full["anchor_only"]["dice"] == res6["anchor_only"]["dice"] and 0.0 <= none["anchor_only"]["dice"] <= 1.0
    # (with test-time mirroring: one member per mirrored view, the anchor their mean)
    anchor_stamp = json.loads((tmp_path / "medsegdiff" / "eval" / "anchor_only_mirror" / "sampling.json").read_text())
    assert anchor_stamp["anchor_weight"] == 1.0 and anchor_stamp["ensemble"] == 4
    assert anchor_stamp["mirror_axes"] == [0, 1] and anchor_stamp["steps"] == 1

    # with --anchor-weight select each variant chooses its own blend on the validation fold, as the main model does,
    # and a run that scores DynUNet pairs every variant against it too (nothing retrains)
    proc6b = run_script("--sampler", "ddim", "--anchor-weight", "select", "--ablations", "none")
    assert proc6b.returncode == 0, proc6b.stdout[-4000:] + proc6b.stderr[-4000:]
    assert "Epoch:" not in proc6b.stdout + proc6b.stderr and "dynunet epoch" not in proc6b.stdout
    res6b = json.loads(results[0].read_text(encoding="utf-8"))
    none_sel = res6b["ablations"]["none"]
    own = pd.read_csv(tmp_path / "ablation_none" / "eval" / "anchor_weight_sweep_mirror.csv")
    weight = own.loc[own["dice"] == own["dice"].max(), "anchor_weight"].min()
    assert none_sel["anchor_weight"] == none_sel["anchor_weight_selection"]["anchor_weight"] == weight
    tag = f"_anchor{weight:g}" if weight > 0 else ""
    stamp = json.loads((tmp_path / "ablation_none" / "eval" / f"evaluation_mirror{tag}" / "sampling.json").read_text())
    assert stamp["anchor_weight"] == weight
    assert ("ensemble_only" in none_sel) == (weight > 0)
    for key, dice in (("medsegdiff", none_sel["dice"]), ("anchor_only", none_sel["anchor_only"]["dice"])):
        gap = none_sel["dice_minus_baseline"][key]
        assert gap["cases"] == 4 and gap["mean"] == pytest.approx(dice - res6b["dice_baseline"], abs=1e-9), key
    # and against the main model as reported, with the blend it chose for itself
    assert none_sel["dice_minus_main_model"]["mean"] == pytest.approx(
        none_sel["dice"] - res6b["dice_medsegdiff"], abs=1e-9)

    # ablations at the main model's epoch count instead of its wall clock: exactly as many iterations
    proc7 = run_script("--sampler", "ddim", "--skip-baseline", "--ablations", "none", "--ablation-budget", "epochs")
    assert proc7.returncode == 0, proc7.stdout[-4000:] + proc7.stderr[-4000:]
    res7 = json.loads(results[0].read_text(encoding="utf-8"))
    equal = res7["ablations_equal_epochs"]["none"]
    assert equal["iterations"] == res["iterations_medsegdiff"] and "ablations" not in res7
    assert res7["ablation_epochs"] == res["iterations_medsegdiff"] // 2  # 2-iteration epochs
    assert (tmp_path / "ablation_none_equal_epochs" / "models" / "final_ema.pt").is_file()

    # the baseline alone (a GPU session of its own): no diffusion model is trained or reported, DynUNet is
    baseline_only = tmp_path / "baseline_only"
    proc8 = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--output", str(baseline_only),
                            "--skip-medsegdiff"], cwd=REPO, capture_output=True, text=True, encoding="utf-8",
                           errors="replace", timeout=600)
    assert proc8.returncode == 0, proc8.stdout[-4000:] + proc8.stderr[-4000:]
    res8 = json.loads(next(baseline_only.glob("quality_*.json")).read_text(encoding="utf-8"))
    assert "dice_medsegdiff" not in res8 and 0.0 <= res8["dice_baseline"] <= 1.0 and res8["baseline"]["cases"] == 4
    assert res8["train_minutes"]["medsegdiff"] is None and res8["train_minutes"]["baseline"] > 0
    assert not (baseline_only / "medsegdiff").exists() and (baseline_only / "dynunet" / "model.pt").is_file()

    # other training settings into the same folders: refused, naming what differs, before anything is trained
    for extra, named in ((["--lr", "0.5"], "learning_rate"), (["--seed", "1"], "seed"),
                         (["--baseline-lr", "0.5", "--sampler", "ddim"], "'lr'")):
        proc5 = run_script(*extra)
        assert proc5.returncode != 0 and "holds a model trained with other settings" in proc5.stderr, extra
        assert named in proc5.stderr and "Epoch:" not in proc5.stdout + proc5.stderr, extra


@pytest.mark.parametrize("value", ["1.5", "-0.1", "half"])
def test_anchor_weight_argument_is_checked(value, capsys):
    with pytest.raises(SystemExit):
        _load_script().parse_args(["--anchor-weight", value])
    assert "--anchor-weight must be a number in [0, 1] or 'select'" in capsys.readouterr().err


def test_paired_difference_pairs_cases_by_id_and_refuses_other_cases(tmp_path):
    """Two evaluations of the same cases, rows in another order and two classes per case: the differences are paired
    by case (each case's mean over classes), not by row."""
    import pandas as pd

    quality = _load_script()
    ref, other, third = tmp_path / "ref.csv", tmp_path / "other.csv", tmp_path / "third.csv"
    pd.DataFrame({"case": ["a", "a", "b", "b", "c", "c"], "class": [1, 2] * 3,
                  "dice": [0.5, 0.7, 0.2, 0.4, 0.9, 0.9]}).to_csv(ref, index=False)  # per case 0.6, 0.3, 0.9
    pd.DataFrame({"case": ["c", "c", "b", "b", "a", "a"], "class": [1, 2] * 3,
                  "dice": [0.8, 0.8, 0.5, 0.5, 0.6, 0.6]}).to_csv(other, index=False)  # per case 0.8, 0.5, 0.6
    gap = quality.paired_difference(ref, other)
    diffs = [0.0, 0.2, -0.1]  # a, b, c
    assert gap["cases"] == 3 and gap["mean"] == pytest.approx(sum(diffs) / 3)
    assert gap["median"] == pytest.approx(0.0) and (gap["cases_higher"], gap["cases_lower"]) == (1, 1)
    mean = sum(diffs) / 3
    assert gap["standard_error"] == pytest.approx((sum((d - mean) ** 2 for d in diffs) / 2) ** 0.5 / 3 ** 0.5)
    pd.DataFrame({"case": ["a", "b", "d"], "class": [1] * 3, "dice": [0.1] * 3}).to_csv(third, index=False)
    with pytest.raises(SystemExit, match="scored different cases"):
        quality.paired_difference(ref, third)


def test_ddpm_comparison_is_evaluated_in_parts_that_survive_interruption(tmp_path, monkeypatch):
    """The slow DDPM-1000 evaluation runs in parts of K cases: finished parts are kept when a later part fails, a
    rerun samples only what is missing, and the joined table has every case once, in the datalist's order."""
    import pandas as pd
    import torch

    import medsegdiff_bundle.engine.workflow as workflow
    from medsegdiff_bundle.evaluation import CANDIDATES

    quality = _load_script()
    root = tmp_path / "medsegdiff"
    (root / "models").mkdir(parents=True)
    torch.save({}, root / "models" / "final_ema.pt")
    ids = list("abcdef")
    test_dl = tmp_path / "datalist_test.json"
    test_dl.write_text(json.dumps({"training": [{"image": f"/x/{c}.jpg", "label": f"/y/{c}.jpg"} for c in ids]}))
    dice = {c: 0.1 * (i + 1) for i, c in enumerate(ids)}
    sampled, broken = [], set()

    def fake_run_bundle(config, workflow_type, bundle_root, datalist, output_dir, **kwargs):
        cases = [Path(c["image"]).stem for c in json.loads(Path(datalist).read_text())["training"]]
        if broken & set(cases):
            raise RuntimeError("sampler died")
        sampled.append(cases)
        assert kwargs["sampler"] == "ddpm" and kwargs["steps"] == 1000
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"case": cases, "class": "class_1", "dice": [dice[c] for c in cases], "iou": 0.0,
                      "hd95": 1.0}).to_csv(Path(output_dir) / "metrics.csv", index=False)
        # and, as MetricsTableHandler does, the largest-component candidates (here: the step changes nothing)
        pd.DataFrame({"case": cases, "class": 1, **{n: [dice[c] for c in cases] for n in CANDIDATES}}).to_csv(
            Path(output_dir) / quality.CANDIDATES_CSV, index=False)

    monkeypatch.setattr(workflow, "run_bundle", fake_run_bundle)
    ddpm = {"sampler": "ddpm", "steps": 1000, "ensemble": 5}

    def evaluate(n):
        return quality.evaluate_medsegdiff_in_parts(root, test_dl, n, 2, {}, ddpm, "ddpm")

    broken.add("c")
    with pytest.raises(RuntimeError, match="sampler died"):
        evaluate(5)
    assert sampled == [["a", "b"]]
    broken.clear()
    sampled.clear()
    result = evaluate(5)  # resumes at the part that failed
    assert sampled == [["c", "d"], ["e"]]
    assert result["cases"] == 5 and result["dice"] == pytest.approx(sum(dice[c] for c in "abcde") / 5)
    assert list(pd.read_csv(result["metrics_csv"])["case"]) == list("abcde")
    sampled.clear()
    result = evaluate(6)  # more cases: only the new last part is sampled
    assert sampled == [["e", "f"]] and result["cases"] == 6
    assert list(pd.read_csv(result["metrics_csv"])["case"]) == ids


@pytest.mark.parametrize("extra, named", [
    (["--skip-baseline"], "leave nothing to train"),
    (["--compare-ddpm", "--trajectory", "3"], "--compare-ddpm, --trajectory need(s) the MedSegDiff-V2 model"),
    (["--anchor-weight", "select"], "--anchor-weight need(s)"),
    (["--ablations", "none"], "--ablations need(s)"),
])
def test_baseline_only_refuses_what_needs_the_diffusion_model(extra, named, capsys):
    with pytest.raises(SystemExit):
        _load_script().parse_args(["--skip-medsegdiff", *extra])
    assert named in capsys.readouterr().err
    assert _load_script().parse_args(["--skip-medsegdiff", "--anchor-weight", "0.0"]).skip_medsegdiff


def test_training_killed_at_a_command_limit_resumes_with_the_rest_of_the_budget(tmp_path, monkeypatch):
    """A GPU session splits a long budget over commands of at most 10 minutes by letting the first one be killed: the
    next command resumes from the last checkpoint, which carries the training time up to it (the killed command's
    work after it is lost, so it is not counted); the bundle is given the whole budget, over which its learning rate
    anneals, and spends what is left of it."""
    import medsegdiff_bundle.engine.workflow as workflow

    quality = _load_script()
    root = tmp_path / "medsegdiff"
    calls = []

    def fake_run_bundle(config, workflow_type, bundle_root, resume, time_budget_minutes, **kwargs):
        calls.append((resume, time_budget_minutes))
        if len(calls) == 1:  # trained 3 minutes up to its last checkpoint, then killed
            ckpt = Path(bundle_root) / "models" / "checkpoint_epoch=7.pt"
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            ckpt.write_bytes(b"")
            start = json.loads((Path(bundle_root) / "train_state.json").read_text())["segment_start"]
            os.utime(ckpt, (start + 180.0, start + 180.0))
            raise KeyboardInterrupt("killed by timeout")

    monkeypatch.setattr(workflow, "run_bundle", fake_run_bundle)
    settings = {"channels": [8, 16], "seed": 0}
    with pytest.raises(KeyboardInterrupt):
        quality.train_medsegdiff(root, 10.0, settings, {"learning_rate": 1e-3})
    assert calls == [(False, 10.0)]
    used = quality.train_medsegdiff(root, 10.0, settings, {"learning_rate": 1e-3})
    assert calls[1] == (True, 10.0)
    assert used == pytest.approx(3.0, abs=0.05)  # 3 counted + the (instant) resumed command
    # done: a further command trains nothing; another budget into the same folder is refused
    assert quality.train_medsegdiff(root, 10.0, settings, {"learning_rate": 1e-3}) == used and len(calls) == 2
    with pytest.raises(SystemExit, match="other settings"):
        quality.train_medsegdiff(root, 12.0, settings, {"learning_rate": 1e-3})


def test_lr_floor_reaches_the_bundle_schedule_and_the_training_stamp(tmp_path, monkeypatch, capsys):
    """--lr-floor sets the bundle's lr_floor (the fraction of the start rate the cosine ends at; default 1, constant),
    names the schedule in the stamp so that a folder trained with another floor is not resumed, and names 0.05 as
    every stamp did before the option (so folders trained with the annealed rate of bundles 0.5-0.7 resume with
    --lr-floor 0.05)."""
    import medsegdiff_bundle.engine.workflow as workflow

    quality = _load_script()
    overrides = []
    monkeypatch.setattr(workflow, "run_bundle", lambda *a, **kwargs: overrides.append(kwargs))
    settings = {"channels": [8, 16], "seed": 0}
    quality.train_medsegdiff(tmp_path / "constant", 1.0, settings, {"learning_rate": 2e-3})
    quality.train_medsegdiff(tmp_path / "annealed", 1.0, settings, {"learning_rate": 2e-3}, lr_floor=0.05)
    assert [o["lr_floor"] for o in overrides] == [1.0, 0.05]
    stamps = [json.loads((tmp_path / name / "training.json").read_text()) for name in ("constant", "annealed")]
    assert [s["lr_schedule"] for s in stamps] == ["constant", "cosine to 0.05 over the time budget"]
    (tmp_path / "constant" / "train_state.json").write_text(json.dumps({"done": False}))
    with pytest.raises(SystemExit, match="lr_schedule"):
        quality.train_medsegdiff(tmp_path / "constant", 1.0, settings, {"learning_rate": 2e-3}, lr_floor=0.05)
    assert quality.parse_args(["--lr-floor", "1"]).lr_floor == 1.0
    with pytest.raises(SystemExit):
        quality.parse_args(["--lr-floor", "1.5"])
    assert "--lr-floor" in capsys.readouterr().err


@pytest.mark.skipif(not (KVASIR / "images").is_dir(), reason="Kvasir-SEG not in ../shared/data")
def test_epochs_train_both_models_that_long_whatever_the_minutes(tmp_path):
    """--epochs replaces the time budget: both models train exactly that many epochs (a --minutes far too short to
    reach them is ignored), each learning rate anneals over them to --lr-floor, and the stamps and the result say so.
    Both train with nnU-Net's augmentation here, which the stamps and the result record too."""
    import torch

    from medsegdiff_bundle.engine import cosine_annealed, latest_checkpoint, load_checkpoint

    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--output", str(tmp_path), "--epochs", "3",
                           "--minutes", "0.0001", "--iterations-per-epoch", "1", "--lr-floor", "0.1", "--steps", "1",
                           "--ensemble", "1", "--no-mirror", "--augmentation", "nnunet"], cwd=REPO,
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads(next(tmp_path.glob("quality_*.json")).read_text(encoding="utf-8"))
    assert res["train_epochs"] == 3 and res["train_minutes_budget"] is None and res["iterations_medsegdiff"] == 3
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "medsegdiff" / "models"))
    assert ckpt["trainer"]["iteration"] == 3 and ckpt["trainer"]["max_epochs"] == 3
    # the bundle's cosine over 3 iterations reaches the floor at the last one; DynUNet's is set per epoch
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.1 * res["settings"]["lr"])
    dyn = torch.load(tmp_path / "dynunet" / "checkpoint.pt", weights_only=True)
    assert dyn["epoch"] == 3 and res["epochs_baseline"] == 3 and res["iterations_baseline"] == 3
    lr = res["settings"]["baseline_lr"]
    assert dyn["optimizer"]["param_groups"][0]["lr"] == pytest.approx(cosine_annealed(lr, 0.1 * lr, 2 / 3))
    for model in ("medsegdiff", "dynunet"):
        stamp = json.loads((tmp_path / model / "training.json").read_text(encoding="utf-8"))
        assert stamp["minutes"] is None and stamp["lr_schedule"] == "cosine to 0.1 over the 3 epochs", stamp
        assert stamp["augmentation"] == "nnunet"
    assert res["augmentation"] == res["settings"]["augmentation"] == "nnunet"
