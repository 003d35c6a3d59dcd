"""``medsegdiff auto`` (fingerprint -> plan -> train -> evaluate, resumable) and DDP training from a plan."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import torch
import torch.distributed as dist

from medsegdiff_bundle.auto import run_auto
from medsegdiff_bundle.data import write_synthetic_dataset
from medsegdiff_bundle.engine.launch import launch_training
from medsegdiff_bundle.planning.fingerprint import extract_fingerprint
from medsegdiff_bundle.planning.planner import plan_dataset, save_plans
from tests.bundle_utils import SHARED_DATA

pytestmark = pytest.mark.slow

QUICK = {"channels": [8, 16, 32], "patch_size": [32, 32], "batch_size": 4, "num_workers": 0, "val_interval": 1,
         "val_steps": 2, "steps": 2, "ensemble": 2}


def test_auto_runs_every_stage_and_resumes_instead_of_repeating(tmp_path):
    datalist = write_synthetic_dataset(tmp_path / "data", 10, (40, 40), seed=11)
    out = tmp_path / "auto"
    summary = run_auto(str(datalist), output=str(out), max_epochs=2, gpus=1, **QUICK)
    for name in ("fingerprint.json", "fingerprint_cases.csv", "plans.json", "bundle_overrides.json",
                 "auto_state.json", "auto_summary.json"):
        assert (out / name).is_file(), name
    plans = json.loads((out / "plans.json").read_text(encoding="utf-8"))
    assert plans["configuration"] == "2d" and set(plans["ddp"]) >= {"world_size", "per_gpu_batch", "grad_accum", "backend"}
    table = pd.read_csv(out / "eval" / "evaluation" / "metrics.csv")
    assert len(table) == 2 and summary["cases_evaluated"] == 2
    # the validation fold's post-processing choice, beside the weights, and the Dice it gives there
    plan = json.loads((out / "models" / "postprocessing.json").read_text(encoding="utf-8"))
    assert plan == json.loads((out / "eval" / "evaluation" / "postprocessing.json").read_text(encoding="utf-8"))
    assert summary["postprocessing"]["steps"] == plan["steps"]
    assert summary["dice_mean_postprocessed"] == pytest.approx(plan["scores"]["dice_after"])
    assert summary["dice_mean"] == pytest.approx(plan["scores"]["dice_before"])
    stamps = {p: p.stat().st_mtime_ns for p in (out / "fingerprint.json", out / "plans.json",
                                                out / "models" / "model.pt")}
    again = run_auto(str(datalist), output=str(out), max_epochs=2, gpus=1, **QUICK)
    assert again["dice_mean"] == summary["dice_mean"]
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # nothing recomputed


def test_auto_continues_an_interrupted_training(tmp_path):
    """A run whose training stopped (time budget) is continued from its checkpoint by the next `auto` call."""
    datalist = write_synthetic_dataset(tmp_path / "data", 10, (32, 32), seed=12)
    out = tmp_path / "auto"
    run_auto(str(datalist), output=str(out), time_budget=1e-6, gpus=1, evaluate=False, **QUICK)
    first = torch.load(sorted((out / "models").glob("checkpoint*.pt"))[-1], weights_only=True)["trainer"]
    assert first["iteration"] == first["epoch_length"]  # the budget stopped it after one epoch
    (out / "auto_state.json").unlink()  # as if the process had been killed before recording completion
    run_auto(str(datalist), output=str(out), max_epochs=3, gpus=1, evaluate=False, **QUICK)
    ckpts = sorted((out / "models").glob("checkpoint*.pt"), key=lambda p: p.stat().st_mtime)
    last = torch.load(ckpts[-1], weights_only=True)["trainer"]
    assert last["iteration"] == 3 * last["epoch_length"]


@pytest.mark.skipif(not (SHARED_DATA / "Kvasir-SEG" / "images").is_dir(), reason="Kvasir-SEG not in ../shared/data")
def test_auto_on_a_small_kvasir_subset(tmp_path):
    kvasir = SHARED_DATA / "Kvasir-SEG"
    images = sorted((kvasir / "images").glob("*.jpg"))[:15]
    cases = [{"image": str(p), "label": str(kvasir / "masks" / p.name), "fold": i % 5} for i, p in enumerate(images)]
    datalist = tmp_path / "kvasir.json"
    datalist.write_text(json.dumps({"training": cases}), encoding="utf-8")
    out = tmp_path / "auto"
    summary = run_auto(str(datalist), output=str(out), label_threshold=127, max_epochs=2, gpus=1,
                       **{**QUICK, "patch_size": [64, 64]})
    plans = json.loads((out / "plans.json").read_text(encoding="utf-8"))
    assert plans["configuration"] == "2d" and plans["patch_size"] == [256, 256]  # the plan; the test runs smaller
    assert [n["scheme"] for n in plans["normalization"]] == ["rgb"] * 3
    assert len(pd.read_csv(out / "eval" / "evaluation" / "metrics.csv")) == 3
    assert 0.0 <= summary["dice_mean"] <= 1.0


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo")
def test_two_process_training_from_a_plan_ends_with_identical_weights(tmp_path):
    datalist = write_synthetic_dataset(tmp_path / "data", 12, (32, 32), seed=13)
    plans = plan_dataset(extract_fingerprint(str(datalist)), gpu_memory_gb=8.0, gpus=2)
    assert plans["ddp"]["world_size"] == 2 and plans["ddp"]["backend"] == "gloo"
    save_plans(plans, tmp_path / "plans")
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"+run": [
        "$torch.save(medsegdiff_bundle.engine.unwrap_model(@network).state_dict(), "
        "@bundle_root + '/rank%d.pt' % dist.get_rank())"]}), encoding="utf-8")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    launch_training(tmp_path / "run", tmp_path / "plans" / "bundle_overrides.json", plans["ddp"]["world_size"],
                    extra_configs=[probe], datalist=str(datalist), dataset_dir=str(datalist.parent), max_epochs=2,
                    val_interval=1,
                    channels=[8, 16, 32], patch_size=[32, 32], batch_size=2, num_workers=0, val_steps=2)
    rank0 = torch.load(tmp_path / "run" / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "run" / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
