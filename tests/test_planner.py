"""Experiment planner: every rule on its own, then whole plans for hand-made fingerprints."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medsegdiff_bundle.planning.memory import GIB, predict_training_memory
from medsegdiff_bundle.planning.planner import (
    ANISO_THRESHOLD,
    MAX_BATCH,
    MEMORY_CACHE_GB,
    PLANS_VERSION,
    anisotropy,
    bundle_normalization,
    bundle_overrides,
    choose_configuration,
    dataset_batch_cap,
    dataset_cache,
    ddp_settings,
    initial_patch_size,
    load_plans,
    lowres_axis_spacing,
    network_topology,
    normalization_scheme,
    normalization_schemes,
    num_classes_from_labels,
    patch_and_batch,
    plan_dataset,
    resampled_shape,
    sampler_settings,
    save_plans,
    target_spacing,
    training_schedule,
)

ROOT = Path(__file__).resolve().parents[1]
TRAIN_KEYS = json.loads((ROOT / "bundle" / "configs" / "train.json").read_text(encoding="utf-8")).keys()


def _intensity(mean, std, p005, p995, lo, hi):
    return {"mean": mean, "std": std, "median": mean, "min": lo, "max": hi,
            "percentile_00_5": p005, "percentile_99_5": p995}


def ct_fp() -> dict:
    """Isotropic abdominal CT, 1 mm, 512x512x300."""
    return {
        "spatial_dims": 3, "num_channels": 1, "modality": {"0": "CT"}, "labels": [0, 1, 2],
        "spacing": {"median": [1.0, 1.0, 1.0], "min": [0.7, 0.7, 0.8], "max": [1.0, 1.0, 1.5]},
        "shape": {"median": [512, 512, 300], "min": [512, 512, 200], "max": [512, 512, 400]},
        "shape_after_crop": {"median": [512, 512, 300]},
        "intensity": {"0": _intensity(100.0, 50.0, -80.0, 260.0, -1024.0, 3000.0)},
        "class_fractions": {"1": 0.05, "2": 0.01}, "num_cases": 100,
    }


def mr_fp() -> dict:
    """Anisotropic 2-channel MR, 0.5 x 0.5 x 5 mm, thick slices."""
    return {
        "spatial_dims": 3, "num_channels": 2, "modality": {"0": "MR", "1": "MR"}, "labels": [0, 1],
        "spacing": {"median": [0.5, 0.5, 5.0], "min": [0.4, 0.4, 3.0], "max": [0.7, 0.7, 6.0]},
        "shape": {"median": [512, 512, 24], "min": [400, 400, 18], "max": [512, 512, 40]},
        "shape_after_crop": {"median": [400, 420, 24]},
        "intensity": {"0": _intensity(300.0, 80.0, 20.0, 900.0, 0.0, 1500.0),
                      "1": _intensity(200.0, 60.0, 10.0, 700.0, 0.0, 1000.0)},
        "class_fractions": {"1": 0.02}, "num_cases": 40,
    }


def rgb_fp() -> dict:
    """2D RGB endoscopy (Kvasir-like), 622x530 median."""
    return {
        "spatial_dims": 2, "num_channels": 3, "modality": {"0": "RGB", "1": "RGB", "2": "RGB"}, "labels": [0, 1],
        "spacing": {"median": [1.0, 1.0], "min": [1.0, 1.0], "max": [1.0, 1.0]},
        "shape": {"median": [622, 530], "min": [332, 487], "max": [1920, 1072]},
        "shape_after_crop": {"median": [622, 530]},
        "intensity": {str(c): _intensity(120.0, 60.0, 3.0, 250.0, 0.0, 255.0) for c in range(3)},
        "class_fractions": {"1": 0.15}, "num_cases": 1000, "label_threshold": 127,
    }


# ------------------------------------------------------------------------------------------------ single rules


def test_choose_configuration():
    assert choose_configuration(rgb_fp()) == "2d"
    assert choose_configuration(ct_fp()) == "3d"
    assert choose_configuration(mr_fp()) == "3d"  # anisotropic volumes stay 3d (nnU-Net: 3d_fullres)
    with pytest.raises(ValueError):
        choose_configuration({**ct_fp(), "spatial_dims": 4})


def test_num_classes_from_labels():
    assert num_classes_from_labels([0, 1]) == 2
    assert num_classes_from_labels([0, 1, 2]) == 3
    assert num_classes_from_labels([0]) == 2
    assert num_classes_from_labels([0, 1, 2, 4]) == 5


def test_anisotropy_rule():
    assert not anisotropy(ct_fp())["anisotropic"]
    a = anisotropy(mr_fp())
    assert a["anisotropic"] and a["axis"] == 2 and a["spacing_ratio"] == pytest.approx(10.0)
    # thick spacing but many slices (not few voxels along that axis): nnU-Net keeps the median
    fp = mr_fp()
    fp["shape_after_crop"]["median"] = [400, 420, 200]
    assert not anisotropy(fp)["anisotropic"]
    # ratio at the threshold is not anisotropic
    fp = mr_fp()
    fp["spacing"]["median"] = [0.5, 0.5, 0.5 * ANISO_THRESHOLD]
    assert not anisotropy(fp)["anisotropic"]


def test_lowres_axis_spacing_sources():
    fp = mr_fp()
    assert lowres_axis_spacing(fp, 2) == (3.0, "spacing_min")  # fallback: the minimum
    fp["cases"] = [{"spacing": [0.5, 0.5, z]} for z in (2.5, 3.5, 4.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 6.0, 6.0)]
    value, source = lowres_axis_spacing(fp, 2)
    assert source == "cases" and value == pytest.approx(3.5)  # numpy 10th percentile of the per-case spacings
    fp["spacing_percentile_10"] = [0.45, 0.45, 4.0]
    assert lowres_axis_spacing(fp, 2) == (4.0, "spacing_percentile_10")


def test_target_spacing_isotropic_is_median():
    assert target_spacing(ct_fp()) == [1.0, 1.0, 1.0]
    assert target_spacing(rgb_fp()) == [1.0, 1.0]


def test_target_spacing_anisotropic_uses_percentile_not_median():
    fp = mr_fp()
    spacing = target_spacing(fp)
    assert spacing[:2] == [0.5, 0.5]
    assert spacing[2] == pytest.approx(3.0) and spacing[2] != fp["spacing"]["median"][2]
    fp["spacing_percentile_10"] = [0.45, 0.45, 4.0]
    assert target_spacing(fp)[2] == pytest.approx(4.0)
    # never finer than the in-plane spacing
    fp["spacing_percentile_10"] = [0.45, 0.45, 0.3]
    assert target_spacing(fp)[2] == pytest.approx(0.5 + 1e-5)


def test_resampled_shape():
    fp = mr_fp()
    assert resampled_shape(fp, [0.5, 0.5, 3.0]) == [400, 420, 40]
    assert resampled_shape(ct_fp(), [2.0, 2.0, 2.0]) == [256, 256, 150]


def test_normalization_scheme_per_modality():
    ct = normalization_scheme("CT", _intensity(40.0, 30.0, -100.0, 200.0, -1000.0, 2000.0))
    assert ct == {"scheme": "ct", "clip": [-100.0, 200.0], "mean": 40.0, "std": 30.0}
    assert normalization_scheme("MR")["scheme"] == "zscore"
    assert normalization_scheme("grey")["scheme"] == "zscore"
    assert normalization_scheme("RGB") == {"scheme": "rgb", "clip": [0.0, 255.0], "mean": None, "std": None}
    # nnU-Net v2 dataset.json colour channel names (our converters write R/G/B) are colour too
    for name in ("R", "G", "b", "rgb_to_0_1"):
        assert normalization_scheme(name) == normalization_scheme("RGB"), name
    with pytest.raises(ValueError):
        normalization_scheme("CT")


def test_a_converted_kvasir_layout_plans_rgb_normalisation(tmp_path):
    """``medsegdiff convert kvasir_seg`` names the channels R, G, B in dataset.json; the plan scales them /255."""
    from PIL import Image

    from medsegdiff_bundle.data.converters import convert
    from medsegdiff_bundle.planning.fingerprint import extract_fingerprint
    from medsegdiff_bundle.planning.planner import bundle_overrides, plan_dataset

    src = tmp_path / "Kvasir-SEG"
    rng = np.random.default_rng(0)
    for folder in ("images", "masks"):
        (src / folder).mkdir(parents=True)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(src / "images" / f"c{i}.jpg")
        mask = np.zeros((40, 48, 3), np.uint8)
        mask[10:30, 12:36] = 255
        Image.fromarray(mask).save(src / "masks" / f"c{i}.jpg")
    datalist = convert("kvasir_seg", src, tmp_path / "converted")
    fp = extract_fingerprint(datalist, label_threshold=127)
    assert fp["modality_source"] == "dataset.json" and fp["modality"] == ["R", "G", "B"]
    plans = plan_dataset(fp, gpu_memory_gb=24, gpus=1, cpu_count=2)
    assert [n["scheme"] for n in plans["normalization"]] == ["rgb"] * 3
    assert bundle_overrides(plans)["normalization"] == "rgb"


def test_normalization_schemes_accept_list_or_dict_fingerprints():
    fp = mr_fp()
    as_list = copy.deepcopy(fp)
    as_list["modality"] = ["MR", "MR"]
    as_list["foreground_intensity"] = [fp["intensity"]["0"], fp["intensity"]["1"]]
    del as_list["intensity"]
    assert normalization_schemes(fp) == normalization_schemes(as_list)
    assert [s["channel"] for s in normalization_schemes(fp)] == [0, 1]


def test_bundle_normalization_mapping():
    ct_inside = {"scheme": "ct", "clip": [-80.0, 260.0], "mean": 100.0, "std": 50.0}
    ct_lung = {"scheme": "ct", "clip": [-950.0, 200.0], "mean": -500.0, "std": 300.0}
    z, rgb = {"scheme": "zscore", "clip": None}, {"scheme": "rgb", "clip": [0.0, 255.0]}
    assert bundle_normalization([ct_inside]) == "ct"
    assert bundle_normalization([ct_lung]) == "zscore"
    assert bundle_normalization([rgb, rgb, rgb]) == "rgb"
    assert bundle_normalization([z, z]) == "zscore"
    assert bundle_normalization([ct_inside, z]) == "zscore"


def test_network_topology():
    t = network_topology([256, 256])  # 2D: stride 16, a 16x16 token grid for the SS-Former
    assert t["levels"] == 5 and t["divisor"] == 16 and t["bottleneck"] == [16, 16]
    assert t["channels"] == [32, 64, 128, 256, 320]
    t = network_topology([96, 112, 96])
    assert t["levels"] == 5 and all(4 <= b < 8 for b in t["bottleneck"][:1])
    assert min(t["bottleneck"]) >= 4 and min(t["bottleneck"]) < 8
    t = network_topology([16, 16])
    assert t["levels"] == 3  # at least 3 levels
    t = network_topology([128, 128], base_width=16, max_width=64, min_bottleneck=4)
    assert t["channels"] == [16, 32, 64, 64, 64, 64]
    t = network_topology([160, 160, 24], spacing=[0.5, 0.5, 3.0])
    assert t["pooling"] == "isotropic" and t["bottleneck"][2] >= 4 and t["bottleneck"][0] > 8


def test_initial_patch_size():
    assert initial_patch_size(rgb_fp(), [1.0, 1.0]) == [256, 256]
    small = rgb_fp()
    small["shape_after_crop"]["median"] = [200, 180]
    assert initial_patch_size(small, [1.0, 1.0]) == [200, 180]
    assert initial_patch_size(ct_fp(), [1.0, 1.0, 1.0]) == [256, 256, 256]
    assert initial_patch_size(mr_fp(), [0.5, 0.5, 3.0]) == [256, 256, 40]  # clipped to the median shape


def test_dataset_batch_cap():
    assert dataset_batch_cap(rgb_fp(), [256, 256], [1.0, 1.0]) == MAX_BATCH[2]  # 5% of 1000 = 50 -> 32
    few = {**rgb_fp(), "num_cases": 60}
    assert dataset_batch_cap(few, [256, 256], [1.0, 1.0]) == 3
    tiny = {**rgb_fp(), "num_cases": 5}
    assert dataset_batch_cap(tiny, [256, 256], [1.0, 1.0]) == 2  # never below the minimum batch
    assert dataset_batch_cap(ct_fp(), [96, 96, 96], [1.0, 1.0, 1.0]) == MAX_BATCH[3]


def test_patch_and_batch_fits_and_is_divisible():
    for fp in (ct_fp(), mr_fp(), rgb_fp()):
        spacing = target_spacing(fp)
        pb = patch_and_batch(fp, spacing, 24.0)
        divisor = pb["topology"]["divisor"]
        assert all(s % divisor == 0 for s in pb["patch_size"])
        assert pb["fits"] and pb["estimate"].total <= pb["budget_bytes"]
        mem = predict_training_memory(fp["spatial_dims"], fp["num_channels"], num_classes_from_labels(fp["labels"]),
                                      pb["topology"]["channels"], 1, pb["patch_size"], pb["batch_size"])
        assert mem.total <= 0.85 * 24.0 * GIB
        assert 2 <= pb["batch_size"] <= MAX_BATCH[fp["spatial_dims"]]


def test_patch_and_batch_tiny_budget_reports_memory_limited_batch():
    pb = patch_and_batch(ct_fp(), [1.0, 1.0, 1.0], 0.1)
    assert not pb["fits"] and pb["max_batch_memory"] < 2 and pb["batch_size"] == 2
    assert min(pb["patch_size"]) >= pb["topology"]["divisor"]


def test_sampler_settings():
    assert sampler_settings(2) == {"sampler": "dpmpp", "steps": 20, "ensemble": 5, "val_sampler": "dpmpp",
                                   "val_steps": 10, "val_ensemble": 1}
    assert sampler_settings(3)["ensemble"] == 3


def test_ddp_settings():
    d = ddp_settings(10, gpus=4, cpu_count=16)
    assert d["world_size"] == 4 and d["per_gpu_batch"] == math.ceil(10 / 4) and d["grad_accum"] == 1
    assert d["num_workers"] == 4 and d["sync_bn"] is False
    assert d["backend"] == ("nccl" if torch.cuda.is_available() else "gloo")
    single = ddp_settings(8, gpus=None, cpu_count=2)
    assert single["world_size"] == max(1, torch.cuda.device_count()) and single["num_workers"] <= 2
    assert ddp_settings(8, gpus=1, cpu_count=64)["num_workers"] == 8
    # memory allows only 1 sample per GPU: accumulate to keep the global batch of 2
    acc = ddp_settings(2, gpus=1, max_per_gpu_batch=1, cpu_count=4)
    assert acc["per_gpu_batch"] == 1 and acc["grad_accum"] == 2 and acc["effective_global_batch"] == 2
    assert ddp_settings(2, gpus=2, max_per_gpu_batch=1, cpu_count=4)["grad_accum"] == 1
    assert ddp_settings(3, gpus=0)["world_size"] == 1


def test_training_schedule():
    s = training_schedule(100, 2)
    assert s["steps_per_epoch"] == 40 and s["max_epochs"] == 625 and s["val_interval"] == 31
    assert training_schedule(10, 2)["max_epochs"] == 1000  # clipped
    assert training_schedule(100000, 32)["max_epochs"] == 50
    assert s["learning_rate"] == 1e-4 and s["num_samples"] == 1


def test_dataset_cache_keeps_what_fits_in_memory_and_the_rest_on_disk():
    fp = rgb_fp()
    small = dataset_cache(fp, [256, 256], [1.0, 1.0])
    per_case = 256 * 256 * (fp["num_channels"] + 1) * 4
    assert small["dataset_cache"] == "memory"
    assert small["cached_gb"] == pytest.approx(fp["num_cases"] * per_case / GIB, abs=1e-4)
    # every data-parallel process holds its own copy: enough of them push it to disk
    processes = math.ceil(MEMORY_CACHE_GB * GIB / (fp["num_cases"] * per_case)) + 1
    assert dataset_cache(fp, [256, 256], [1.0, 1.0], world_size=processes)["dataset_cache"] == "disk"
    # 3D counts the resampled volume, not the patch
    ct = ct_fp()
    big = dataset_cache({**ct, "num_cases": 10_000}, [64, 64, 64], [1.0, 1.0, 1.0])
    assert big["dataset_cache"] == "disk" and big["cached_gb"] > MEMORY_CACHE_GB


# ------------------------------------------------------------------------------------------------- whole plans


def test_plan_isotropic_ct():
    fp = ct_fp()
    p = plan_dataset(fp, gpu_memory_gb=24.0)
    assert p["plans_version"] == PLANS_VERSION and p["configuration"] == "3d"
    assert p["target_spacing"] == [1.0, 1.0, 1.0]
    assert p["normalization"] == [{"channel": 0, "modality": "CT", "scheme": "ct", "clip": [-80.0, 260.0],
                                   "mean": 100.0, "std": 50.0}]
    assert p["bundle_normalization"] == "ct"
    assert all(s % p["network"]["divisor"] == 0 for s in p["patch_size"])
    assert p["memory"]["predicted_peak_gb"] <= p["memory"]["budget_gb"] == pytest.approx(0.85 * 24.0)
    assert p["num_classes"] == 3 and p["in_channels"] == 1
    assert 2 <= p["batch_size"] <= MAX_BATCH[3]
    for key in ("configuration", "target_spacing", "patch_size", "batch_size", "normalization", "ddp", "network",
                "sampler", "memory", "fingerprint_summary"):
        assert key in p
    assert set(p["ddp"]) >= {"world_size", "per_gpu_batch", "grad_accum", "backend", "num_workers", "sync_bn"}
    assert set(p["network"]) >= {"channels", "num_res_blocks"}


def test_plan_anisotropic_mr():
    fp = mr_fp()
    p = plan_dataset(fp, gpu_memory_gb=24.0)
    assert p["configuration"] == "3d"
    assert p["target_spacing"][2] == pytest.approx(3.0) != fp["spacing"]["median"][2]
    assert p["fingerprint_summary"]["anisotropy"]["anisotropic"]
    assert [n["scheme"] for n in p["normalization"]] == ["zscore", "zscore"]
    assert p["bundle_normalization"] == "zscore"
    assert any("anisotropic" in n for n in p["notes"])
    assert all(s % p["network"]["divisor"] == 0 for s in p["patch_size"])
    assert p["memory"]["predicted_peak_gb"] <= p["memory"]["budget_gb"]


def test_plan_rgb_2d():
    p = plan_dataset(rgb_fp(), gpu_memory_gb=24.0)
    assert p["configuration"] == "2d" and p["patch_size"] == [256, 256]
    assert [n["scheme"] for n in p["normalization"]] == ["rgb"] * 3 and p["bundle_normalization"] == "rgb"
    assert 2 <= p["batch_size"] <= MAX_BATCH[2]
    assert p["label_threshold"] == 127
    assert p["sampler"]["ensemble"] == 5
    assert p["memory"]["predicted_peak_gb"] <= p["memory"]["budget_gb"]


@pytest.mark.parametrize("make", [ct_fp, mr_fp, rgb_fp])
def test_more_gpu_memory_never_gives_a_smaller_patch(make):
    previous = None
    for gb in (4.0, 8.0, 16.0, 24.0, 48.0, 80.0):
        p = plan_dataset(make(), gpu_memory_gb=gb)
        if previous is not None:
            assert all(a >= b for a, b in zip(p["patch_size"], previous["patch_size"])), (gb, p["patch_size"])
            if p["patch_size"] == previous["patch_size"]:
                assert p["batch_size"] >= previous["batch_size"]
        previous = p


def test_plan_ddp_four_gpus():
    p1 = plan_dataset(rgb_fp(), gpu_memory_gb=24.0, gpus=1)
    p4 = plan_dataset(rgb_fp(), gpu_memory_gb=24.0, gpus=4)
    assert p4["batch_size"] == p1["batch_size"]
    assert p4["ddp"]["world_size"] == 4 and p4["ddp"]["per_gpu_batch"] == math.ceil(p4["batch_size"] / 4)
    assert p4["ddp"]["backend"] == ("nccl" if torch.cuda.is_available() else "gloo")
    assert p4["ddp"]["sync_bn"] is False
    assert bundle_overrides(p4)["batch_size"] == p4["ddp"]["per_gpu_batch"]


def test_plan_is_deterministic():
    a = plan_dataset(ct_fp(), gpu_memory_gb=16.0, gpus=2, cpu_count=8)
    b = plan_dataset(ct_fp(), gpu_memory_gb=16.0, gpus=2, cpu_count=8)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_plan_does_not_modify_the_fingerprint():
    fp = mr_fp()
    before = copy.deepcopy(fp)
    plan_dataset(fp)
    assert fp == before


def test_save_plans_and_bundle_overrides(tmp_path):
    from monai.bundle import ConfigParser

    p = plan_dataset(ct_fp(), gpu_memory_gb=24.0, gpus=1, cpu_count=4)
    plans_path, overrides_path = save_plans(p, tmp_path)
    assert plans_path.name == "plans.json" and overrides_path.name == "bundle_overrides.json"
    assert load_plans(tmp_path) == json.loads(json.dumps(p))
    overrides = json.loads(overrides_path.read_text(encoding="utf-8"))
    assert set(overrides) <= set(TRAIN_KEYS)
    assert overrides["normalization"] in ("rgb", "zscore", "ct", "none")
    assert overrides["patch_size"] == p["patch_size"] and overrides["channels"] == p["network"]["channels"]
    assert overrides["target_spacing"] == p["target_spacing"]
    assert overrides["dataset_cache"] == p["data"]["dataset_cache"] in ("memory", "disk")
    # what `monai.bundle run --config_file "['train.json', 'bundle_overrides.json']"` resolves
    parser = ConfigParser()
    parser.read_config([str(ROOT / "bundle" / "configs" / "train.json"), str(overrides_path)])
    for key, value in overrides.items():
        assert parser.get_parsed_content(key) == value, key
    assert parser.get_parsed_content("network_def#channels") == p["network"]["channels"]
    assert parser.get_parsed_content("train#dataloader#batch_size") == overrides["batch_size"]


def test_bundle_overrides_2d_has_no_target_spacing(tmp_path):
    p = plan_dataset(rgb_fp(), gpu_memory_gb=24.0, gpus=1, cpu_count=4)
    o = bundle_overrides(p)
    assert o["target_spacing"] is None and o["spatial_dims"] == 2 and o["normalization"] == "rgb"
    assert o["label_threshold"] == 127 and o["val_steps"] == 10 and o["val_ensemble"] == 1


def test_load_plans_rejects_other_versions(tmp_path):
    (tmp_path / "plans.json").write_text(json.dumps({"plans_version": 99}), encoding="utf-8")
    with pytest.raises(ValueError):
        load_plans(tmp_path)
