"""Smoke tests of ``benchmarks/speed.py`` (tiny settings on CPU, run as a subprocess like a user would) and of the
plumbing of ``benchmarks/device/run.sh`` (the GPU session script)."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "speed.py"


def _run(tmp_path: Path, name: str, *extra: str) -> dict:
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--preset", "small", "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "speedup" in proc.stdout  # the human-readable table
    return json.loads(out.read_text())


def _positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_speed_benchmark_smoke(tmp_path):
    steps, measured = 2, 2
    result = _run(
        tmp_path, "smoke", "--size", "32", "--train-batch", "2", "--train-iters", "2", "--train-warmup", "1",
        "--steps", str(steps), "--repeats", "1", "--reference-steps-measured", str(measured), "--profile", "1",
    )
    for key in ("device", "torch_version", "monai_version", "date", "settings", "phases"):
        assert key in result, key
    assert result["complete"] is True
    assert result["settings"]["size"] == 32 and result["settings"]["ensemble"] == 5
    assert result["settings"]["parameter_count"] > 0
    numbers = ("ensemble_latency_s", "reference_latency_s", "speedup", "train_img_per_s",
               "ensemble5_latency_s_32", "reference_latency_s_32", "train_img_per_s_32")
    for key in numbers:
        assert _positive_finite(result[key]), (key, result.get(key))
    assert math.isfinite(result["train_peak_mem_gb"]) and result["train_peak_mem_gb"] >= 0
    # the _256 keys name the size: absent when another size was measured
    assert "ensemble5_latency_s_256" not in result and "train_img_per_s_256" not in result

    fast, ref = result["phases"]["fast"], result["phases"]["reference"]
    # the fast path must beat the original compute pattern even for a tiny model
    assert result["speedup"] > 1
    assert result["speedup"] == pytest.approx(ref["latency_per_image_s"] / fast["latency_per_image_s"])
    # fast path: condition network once per sampling call, one denoiser call per solver step
    assert fast["condition_calls"] == fast["sampling_calls"] == 1
    assert fast["denoise_calls"] == steps and fast["mirror_axes"] == []
    # reference: extrapolated from `measured` steps of one member, condition recomputed at every step
    assert result["reference_extrapolated"] is True and ref["extrapolated"] is True
    assert ref["measured_steps"] == measured and ref["measured_members"] == 1
    assert ref["condition_calls"] == ref["denoise_calls"] == measured * ref["measured_members"]
    assert ref["condition_calls_full_run"] == 1000 * 5
    assert ref["latency_per_image_s"] == pytest.approx(ref["per_step_s"] * 1000 * 5)
    assert fast["output_finite"] and ref["output_finite"] and result["phases"]["train"]["loss_finite"]
    # the profile of one more fast-path call (not counted in the calls above): shares by operator kind
    prof = fast["profile"]
    assert prof["calls"] == 1 and prof["time_kind"] == "self CPU time" and prof["total_ms"] > 0
    assert sum(v["percent"] for v in prof["by_kind"].values()) == pytest.approx(100.0)
    assert prof["by_kind"]["convolution"]["percent"] > 10 and "fft" in prof["by_kind"]  # convs; the SS-Former's FFTs
    assert prof["top_ops"][0]["ms"] >= prof["top_ops"][-1]["ms"]


@pytest.mark.slow
def test_speed_benchmark_full_reference_counts_condition_calls(tmp_path):
    steps, ensemble = 3, 2
    result = _run(
        tmp_path, "full", "--size", "16", "--skip-train", "--ensemble", str(ensemble), "--steps", "2",
        "--repeats", "1", "--reference-steps", str(steps), "--reference-full",
        "--condition-channels", "16", "32", "64", "256", "--mirror",
    )
    ref = result["phases"]["reference"]
    assert result["settings"]["condition_channels"] == [16, 32, 64, 256]
    assert result["settings"]["channels"] == [16, 32, 64, 128]
    assert result["reference_extrapolated"] is False
    # every member sequentially at batch 1, the condition network rerun at every step: steps x members
    assert ref["measured_members"] == ensemble and ref["measured_steps"] == steps
    assert ref["condition_calls"] == ref["denoise_calls"] == steps * ensemble
    # with test-time mirroring the condition network still runs in one call, on both views of the image at once
    assert result["phases"]["fast"]["condition_calls"] == 1 and result["phases"]["fast"]["mirror_axes"] == [0, 1]
    assert "ensemble2_latency_s_16" in result and "train_img_per_s" not in result


@pytest.mark.slow
def test_speed_benchmark_compiled_with_several_training_batches(tmp_path):
    """--compile reaches both the training forward and the inferer's denoiser (traced by aot_eager here; the mode is
    inductor's and only recorded), the calls are still counted through the compiled view, and of several training
    batches the fastest one within the memory limit is the reported one."""
    steps = 2
    result = _run(
        tmp_path, "compiled", "--size", "32", "--train-batch", "2", "3", "--train-iters", "2", "--train-warmup", "1",
        "--steps", str(steps), "--repeats", "1", "--reference-steps-measured", "2", "--compile",
        "--compile-backend", "aot_eager", "--compile-mode", "reduce-overhead",
    )
    runs = result["phases"]["train_by_batch"]
    assert [r["batch"] for r in runs] == [2, 3] and all(r["compiled"] and r["loss_finite"] for r in runs)
    chosen = result["phases"]["train"]
    within = [r for r in runs if r["peak_mem_gb"] <= 12.0]
    assert chosen["within_mem_limit"] and chosen["img_per_s"] == max(r["img_per_s"] for r in within)
    assert result["train_img_per_s_32"] == chosen["img_per_s"]
    fast = result["phases"]["fast"]
    assert fast["compiled_denoiser"] and fast["compile_mode"] == "reduce-overhead"
    assert fast["condition_calls"] == fast["sampling_calls"] == 1 and fast["denoise_calls"] == steps


def test_speed_benchmark_keeps_the_finished_phases_of_a_run_cut_short(tmp_path, monkeypatch):
    """A device call's time limit can stop the script in a later phase: what was measured before is on disk."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import speed

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt("the time limit")

    monkeypatch.setattr(speed, "bench_reference", stopped)
    out = tmp_path / "cut.json"
    with pytest.raises(KeyboardInterrupt):
        speed.main(["--device", "cpu", "--preset", "small", "--size", "16", "--train-batch", "1", "--train-iters", "1",
                    "--train-warmup", "0", "--steps", "1", "--repeats", "1", "--out", str(out)])
    partial = json.loads(out.read_text())
    assert partial["complete"] is False and set(partial["phases"]) == {"train", "fast"}
    assert _positive_finite(partial["ensemble5_latency_s_16"]) and _positive_finite(partial["train_img_per_s_16"])
    assert "speedup" not in partial and "reference_latency_s" not in partial


def test_default_result_files_of_a_second_run_on_the_same_day_keep_the_first(tmp_path, monkeypatch):
    """A benchmark run without ``--out`` names its file by device and date; an existing file is never replaced."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import speed
    import torch

    from medsegdiff_bundle.utils import unused_path

    monkeypatch.setattr(speed, "_ROOT", tmp_path)
    first = speed.default_out(torch.device("cpu"), "2026-01-02")
    assert first.parent == tmp_path / "benchmarks" / "results" and first.name.endswith("_2026-01-02.json")
    first.parent.mkdir(parents=True)
    first.write_text("{}")
    second = speed.default_out(torch.device("cpu"), "2026-01-02")
    assert second.name == first.name.replace(".json", "_2.json")
    second.write_text("{}")
    assert speed.default_out(torch.device("cpu"), "2026-01-02").name == first.name.replace(".json", "_3.json")
    assert unused_path(tmp_path / "none.nii.gz") == tmp_path / "none.nii.gz"
    assert first.read_text() == "{}"  # untouched


def test_speed_benchmark_reports_the_least_memory_when_no_batch_fits():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from speed import pick_train_run

    runs = [{"batch": 8, "img_per_s": 70.0, "peak_mem_gb": 5.1}, {"batch": 32, "img_per_s": 150.0, "peak_mem_gb": 19.0}]
    assert pick_train_run(runs, 12.0)["batch"] == 8
    assert pick_train_run(runs, 24.0)["batch"] == 32 and pick_train_run(runs, 24.0)["within_mem_limit"]
    none_fit = pick_train_run(runs, 4.0)
    assert none_fit["batch"] == 8 and none_fit["within_mem_limit"] is False


@pytest.mark.parametrize("name, kind", [
    ("aten::mkldnn_convolution", "convolution"), ("sm90_xmma_fprop_implicit_gemm_bf16", "convolution"),
    ("aten::native_group_norm", "normalization"), ("void at::native::(anonymous)::RowwiseMomentsCUDAKernel", "normalization"),
    ("aten::_fft_r2c", "fft"), ("void regular_fft<256u>", "fft"), ("aten::addmm", "matmul"),
    ("ampere_bf16_s16816gemm_bf16_128x64", "matmul"), ("aten::_scaled_dot_product_flash_attention", "attention"),
    ("aten::copy_", "copy / layout"), ("aten::silu", "other"),
])
def test_profile_kinds_by_name(name, kind):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from op_profile import op_kind

    assert op_kind(name) == kind


def test_cuda_profile_counts_each_kernel_once():
    """kineto reports a kernel's time under its own event and again as the launching aten op's self device time; the
    CUDA summary keeps the kernels only, the CPU one the operators' self CPU time."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from op_profile import timed_rows

    def event(key, device_type, cpu_us, device_us, count=1, annotation=False):
        return SimpleNamespace(key=key, device_type=device_type, self_cpu_time_total=cpu_us,
                               self_device_time_total=device_us, count=count, is_user_annotation=annotation)

    events = [event("aten::native_group_norm", DeviceType.CPU, 30.0, 40.0, 4),
              event("RowwiseMomentsCUDAKernel<c10::BFloat16>", DeviceType.CUDA, 0.0, 33.0, 4),
              event("elementwise_kernel<group_norm_apply>", DeviceType.CUDA, 0.0, 7.0, 4),
              event("aten::empty", DeviceType.CPU, 5.0, 0.0),
              event("## fast path ##", DeviceType.CUDA, 0.0, 100.0, annotation=True)]
    cuda_rows = timed_rows(events, cuda=True)
    assert [r["name"] for r in cuda_rows] == ["RowwiseMomentsCUDAKernel<c10::BFloat16>",
                                              "elementwise_kernel<group_norm_apply>"]
    assert sum(r["us"] for r in cuda_rows) == 40.0 and cuda_rows[0]["kind"] == "normalization"
    cpu_rows = timed_rows(events, cuda=False)
    assert [(r["name"], r["us"]) for r in cpu_rows] == [("aten::native_group_norm", 30.0), ("aten::empty", 5.0)]


def test_speed_benchmark_refuses_condition_widths_of_another_depth(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--preset", "small", "--condition-channels",
                           "16", "32", "--out", str(tmp_path / "x.json")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "as many levels as channels" in proc.stderr
    assert not (tmp_path / "x.json").exists()


# --------------------------------------------------------------------------- benchmarks/device/run.sh (plumbing)
DEVICE_SCRIPT = ROOT / "benchmarks" / "device" / "run.sh"


def _device_script(tmp_path: Path, *stages: str) -> subprocess.CompletedProcess:
    """run.sh as on the GPU machine, on CPU, with the installed packages (no wheels) and this interpreter."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "DEVICE": "cpu", "WHEEL_DIR": str(tmp_path / "no_wheels"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["bash", str(DEVICE_SCRIPT), *stages], cwd=ROOT, env=env, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=300)


def test_device_script_refuses_unknown_stages(tmp_path):
    assert _device_script(tmp_path).returncode == 2
    assert _device_script(tmp_path, "benchmark").returncode == 2


@pytest.mark.slow
def test_device_script_runs_the_gpu_tests_stage_and_reports(tmp_path):
    """The `tests` stage end to end: environment report, tests/test_gpu.py (skipped without CUDA), summary."""
    proc = _device_script(tmp_path, "tests")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    assert "torch" in (out / "env.txt").read_text()
    log = (out / "tests.log").read_text()
    import torch

    assert ("passed" if torch.cuda.is_available() else "skipped") in log
    assert "tests: rc=0" in proc.stdout
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back


@pytest.mark.slow
def test_epoch_overhead_benchmark_compares_the_two_epoch_definitions(tmp_path):
    out = tmp_path / "epoch.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "epoch_overhead.py"), "--minutes", "0.02", "--cases", "12",
           "--size", "32", "--channels", "8", "16", "--batch-size", "4", "--num-workers", "0",
           "--iterations-per-epoch", "5", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    one_pass, fixed = result["one_pass"], result["fixed_length"]
    assert fixed["epoch_length"] == 5 and one_pass["epoch_length"] < 5  # a pass over ~10 cases is 3 batches of 4
    for arm in (one_pass, fixed):  # the budget stops each arm at an epoch end
        assert arm["iterations"] > 0 and arm["iterations"] % arm["epoch_length"] == 0
        assert _positive_finite(arm["iterations_per_minute"])
    assert result["speedup"] == pytest.approx(fixed["iterations_per_minute"] / one_pass["iterations_per_minute"])


def test_data_cache_benchmark_measures_every_cache(tmp_path):
    out = tmp_path / "cache.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "data_cache.py"), "--synthetic", "--cases", "6", "--size", "32",
           "--batch-size", "2", "--batches", "2", "--num-workers", "0", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["data"] == "synthetic" and [r["cache"] for r in result["runs"]] == ["none", "memory", "disk"]
    for run in result["runs"]:
        for key in ("first_pass_ms_per_sample", "ms_per_sample", "loader_img_per_s"):
            assert _positive_finite(run[key]), (run["cache"], key)
    bad = subprocess.run(cmd[:2] + ["--synthetic", "--caches", "ram"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown ['ram']" in bad.stderr


def test_resolution_ceiling_scores_the_ground_truth_through_the_resize_and_its_inversion(tmp_path):
    """A 64x64 mask predicted at 8x8: a square on the 8-pixel grid survives exactly, a one-pixel line (an eighth of
    each block it crosses) does not survive at all; at the image's own size nothing is lost."""
    import numpy as np
    from PIL import Image

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    square, line = np.zeros((64, 64), np.uint8), np.zeros((64, 64), np.uint8)
    square[16:48, 8:40] = 255
    line[29, 4:60] = 255
    for name, mask in (("line", line), ("square", square)):
        Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(data / "images" / f"{name}.png")
        Image.fromarray(mask).save(data / "masks" / f"{name}.png")
    out = tmp_path / "ceiling.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "resolution_ceiling.py"), "--data", str(data), "--all-cases",
           "--sizes", "8", "64", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    coarse, full = result["by_size"]["8"], result["by_size"]["64"]
    assert coarse["cases"] == full["cases"] == 2
    assert coarse["lowest"] == {"line": 0.0, "square": 1.0} and coarse["dice_mean"] == 0.5
    assert full["dice_mean"] == 1.0 and full["dice_min"] == 1.0
    # a split case without its files is named, not skipped
    (data / "masks" / "line.png").unlink()
    bad = subprocess.run(cmd[:2] + ["--data", str(data)], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "no image with a mask for 124 split case(s)" in bad.stderr


def test_condition_probe_trains_every_backbone_alike(tmp_path):
    out = tmp_path / "probe.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "condition_probe.py"), "--synthetic", "--iterations", "3",
           "--size", "32", "--channels", "8", "16", "--batch-size", "2", "--num-workers", "0", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["data"] == "synthetic" and result["train_cases"] == 8
    assert [r["model"] for r in result["runs"]] == ["plain", "residual", "dynunet"]
    for run in result["runs"]:
        assert run["iterations"] == 3 and run["held_out_cases"] == 4
        assert 0.0 <= run["held_out_dice"] <= 1.0 and _positive_finite(run["s_per_iteration"])
    # the two condition backbones at the same widths are different networks
    assert result["runs"][0]["parameters_m"] != result["runs"][1]["parameters_m"]
    bad = subprocess.run(cmd[:2] + ["--synthetic", "--models", "vit"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown ['vit']" in bad.stderr


def test_step_cost_times_every_configuration_in_every_round(tmp_path):
    out = tmp_path / "steps.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step_cost.py"), "--medsegdiff", "narrow", "8,16",
           "--dynunet", "dynunet", "8", "16", "--medsegdiff", "wide-condition", "8,16", "16,32",
           "--medsegdiff", "no-ssformer", "8,16", "semantic=none", "--size", "32",
           "--batch", "2", "--rounds", "3", "--steps", "1", "--warmup", "1", "--out", str(out)]
    layouts = ["--layouts", "bundle", "channels-last"]
    proc = subprocess.run(cmd + layouts, cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace",
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    # MedSegDiff-V2 entries first, in the order given, each in every layout; then DynUNet; the first is the reference
    assert [r["name"] for r in runs] == ["narrow/bundle", "narrow/channels-last", "wide-condition/bundle",
                                         "wide-condition/channels-last", "no-ssformer/bundle",
                                         "no-ssformer/channels-last", "dynunet"]
    assert runs[0]["relative"] == 1.0
    for run in runs:
        assert len(run["s_per_step_rounds"]) == 3 and all(_positive_finite(t) for t in run["s_per_step_rounds"])
        assert math.isclose(run["relative"], run["s_per_step_median"] / runs[0]["s_per_step_median"])
    # a layout is the same network; the wider condition UNet is a larger one at the same denoiser widths
    assert runs[1]["parameters_m"] == runs[0]["parameters_m"] < runs[2]["parameters_m"]
    # the ablation switch reached the network: the same widths without the SS-Former are fewer parameters
    assert runs[4]["parameters_m"] < runs[0]["parameters_m"]
    switch = subprocess.run(cmd[:2] + ["--medsegdiff", "x", "8,16", "ssformer=off"], cwd=ROOT, capture_output=True,
                            text=True)
    assert switch.returncode != 0 and "--medsegdiff x: unknown switch(es) ['ssformer']" in switch.stderr
    mode = subprocess.run(cmd[:2] + ["--medsegdiff", "x", "8,16", "semantic=fft", "--size", "32"], cwd=ROOT,
                          capture_output=True, text=True)
    assert mode.returncode != 0 and "configuration 'x'" in mode.stderr and "semantic must be one of" in mode.stderr
    bad = subprocess.run(cmd[:2] + ["--medsegdiff", "x", "8,y"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "--medsegdiff x: widths must be comma-separated integers, got '8,y'" in bad.stderr
    same = subprocess.run(cmd[:2] + ["--medsegdiff", "x", "8,16", "--dynunet", "x", "8", "16"], cwd=ROOT,
                          capture_output=True, text=True)
    assert same.returncode != 0 and "names must differ" in same.stderr
    one_level = subprocess.run(cmd[:2] + ["--medsegdiff", "flat", "8", "--size", "32"], cwd=ROOT,
                               capture_output=True, text=True)
    assert one_level.returncode != 0 and "configuration 'flat' (8):" in one_level.stderr
    assert "Traceback" not in one_level.stderr


def test_the_condition_only_training_step_trains_the_condition_unet_alone(monkeypatch):
    """``speed.training_step(condition_only=True)``, which ``step_cost.py``'s ``phase=condition`` times."""
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import speed
    import step_cost

    from medsegdiff_bundle.networks import MedSegDiffV2

    torch.manual_seed(0)
    image, label = torch.randn(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.5).long()
    for condition_only in (True, False):
        net = MedSegDiffV2(spatial_dims=2, in_channels=3, num_classes=2, channels=(8, 16))
        before = {k: v.clone() for k, v in net.state_dict().items()}
        step, _ = speed.training_step(net, image, label, amp=False, condition_only=condition_only)
        step()
        changed = {k.split(".")[0] for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
        assert "condition_unet" in changed
        assert ("diffusion_unet" in changed) != condition_only, (condition_only, changed)
    assert step_cost.medsegdiff_spec(["x", "8,16", "phase=condition"])[2] == {"phase": "condition"}
    with pytest.raises(argparse.ArgumentTypeError, match="phase must be one of"):
        step_cost.medsegdiff_spec(["x", "8,16", "phase=both"])


def _weights_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("device_weights", ROOT / "benchmarks" / "device" / "weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_device_weights_come_back_in_parts_and_join_to_the_trained_ema(tmp_path):
    """A session cut short after training brings the EMA back in parts under the device tool's file size limit;
    the split reads the newest checkpoint without writing final_ema.pt (a later evaluation would take that stale
    file for the final weights), and the joined file is the EMA state dict quality.py evaluates."""
    import torch

    weights = _weights_script()
    root = tmp_path / "medsegdiff"
    ema = {"module.a.weight": torch.rand(40, 50), "module.b.weight": torch.rand(300), "module.c.bias": torch.rand(7),
           "num_updates": torch.tensor(12)}
    (root / "models").mkdir(parents=True)
    torch.save({"ema": {k: v * 0 for k, v in ema.items()}}, root / "models" / "checkpoint_epoch=1.pt")
    torch.save({"ema": ema}, root / "models" / "checkpoint_epoch=2.pt")  # the newest
    parts = weights.split(root, tmp_path / "out", part_bytes=1500)  # a: 8000 bytes alone, b + c together
    assert [sorted(torch.load(p, weights_only=True)) for p in parts] == [["a.weight"], ["b.weight", "c.bias"]]
    assert not (root / "models" / "final_ema.pt").exists()
    target = tmp_path / "here" / "final_ema.pt"
    assert weights.join(parts, target) == 3
    joined = torch.load(target, weights_only=True)
    assert all(torch.equal(joined[k[len("module."):]], v) for k, v in ema.items() if k.startswith("module."))
    with pytest.raises(ValueError, match="already came"):
        weights.join([parts[0], parts[0]], tmp_path / "twice.pt")


def test_pair_results_pairs_two_result_files_by_case_and_names_what_cannot_be_paired(tmp_path):
    """Two runs' ``dice_per_case`` give the per-case difference (other − reference), whichever model entry each
    file contributes; a file without per-case Dice, or runs over different cases, are refused naming the file."""
    script = ROOT / "benchmarks" / "pair_results.py"
    reference = {"medsegdiff": {"dice_per_case": {"a": 0.5, "b": 0.9, "c": 0.8, "d": 0.7}}}
    other = {"baseline": {"dice_per_case": {"d": 0.7, "c": 0.6, "b": 0.95, "a": 0.8}}, "medsegdiff": {"dice": 0.8}}
    (tmp_path / "ref.json").write_text(json.dumps(reference))
    (tmp_path / "other.json").write_text(json.dumps(other))

    def run(*args):
        return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    proc = run(tmp_path / "ref.json", tmp_path / "other.json", "--models", "medsegdiff", "baseline",
               "--out", tmp_path / "pair.json")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((tmp_path / "pair.json").read_text())["other_minus_reference"]
    diffs = [0.3, 0.05, -0.2, 0.0]  # a, b, c, d, matched by case id, not by order
    mean = sum(diffs) / 4
    assert stats["mean"] == pytest.approx(mean)
    assert stats["standard_error"] == pytest.approx(math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3 / 4))
    assert stats["median"] == pytest.approx(0.025) and (stats["cases_higher"], stats["cases_lower"]) == (2, 1)
    assert "higher on 2 cases, lower on 1" in proc.stdout

    means_only = run(tmp_path / "ref.json", tmp_path / "other.json")  # other.json's medsegdiff has a mean only
    assert means_only.returncode != 0
    assert f"{tmp_path / 'other.json'} has no medsegdiff.dice_per_case" in means_only.stderr
    other["baseline"]["dice_per_case"].pop("d")
    (tmp_path / "other.json").write_text(json.dumps(other))
    fewer = run(tmp_path / "ref.json", tmp_path / "other.json", "--models", "medsegdiff", "baseline")
    assert fewer.returncode != 0 and "scored different cases" in fewer.stderr and "Traceback" not in fewer.stderr
