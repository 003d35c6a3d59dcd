"""Measure and fit the peak-training-memory model of MedSegDiff-V2; writes
``medsegdiff_bundle/planning/memory_model.json`` (see :mod:`medsegdiff_bundle.planning.memory` for the model).

Steps (about 4-5 minutes on a 2-core CPU):

1. **Saved activations** (in this process): bytes saved for backward by one training forward, measured with
   ``saved_tensors_hooks`` on small 2D/3D configurations (``FIT_GRID``: widths, depths, residual blocks, channels,
   classes, batch and patch sizes all varied). The five coefficients of
   ``activations = sum_k coef_k * feature_k`` are fitted by non-negative least squares on relative errors.
2. **AMP ratio**: the same measurement under CPU bf16 autocast (``AMP_GRID``), minus the bf16 weight copies
   (``2 P``), divided by the fp32 prediction; the mean ratio is stored.
3. **Overhead**: real training steps in a fresh process (``torch.profiler`` memory events) on small ``OVERHEAD_FIT``
   configurations; ``overhead_factor`` = least-squares ratio of the measured peak growth to the predicted
   activations; ``optimizer_factor`` = largest optimiser-phase growth / (4 P).
4. **Validation** (held out; larger than anything fitted): ``VALIDATION`` configurations measured the same way
   (profiler) and cross-checked by the peak-RSS growth (``MALLOC_MMAP_THRESHOLD_=65536``); predicted vs measured
   peak (static + growth) and the relative errors go to the JSON. On a CUDA machine step 4 also records
   ``torch.cuda.max_memory_allocated`` (``--cuda``; default when a GPU is present).

Usage::

    python benchmarks/memory_fit.py [--output PATH] [--no-rss] [--cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import nnls

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medsegdiff_bundle.planning.memory import (  # noqa: E402
    FEATURE_NAMES,
    MEMORY_MODEL_PATH,
    activation_features,
    count_parameters,
    measure_saved_activations,
    measure_training_peak,
    predict_activation_bytes,
    predict_training_memory,
)

C4 = [32, 64, 128, 256]
C4S = [16, 32, 64, 128]
C4T = [8, 16, 32, 64]


def cfg(dims, cin, ncls, channels, nrb, patch, batch):
    return dict(spatial_dims=dims, in_channels=cin, num_classes=ncls, channels=list(channels), num_res_blocks=nrb,
                patch_size=list(patch), batch_size=batch)


# step 1: small, fast configurations (forward only)
FIT_GRID = [
    cfg(2, 3, 2, C4, 1, (32, 32), 2),
    cfg(2, 3, 2, C4, 1, (64, 64), 1),
    cfg(2, 3, 2, C4, 1, (64, 96), 2),
    cfg(2, 3, 2, C4, 1, (96, 96), 1),
    cfg(2, 1, 4, C4S, 1, (64, 64), 2),
    cfg(2, 3, 2, [32, 64, 128, 128], 1, (64, 64), 1),
    cfg(2, 3, 2, [16, 32, 64, 128, 256], 1, (96, 96), 1),
    cfg(2, 3, 2, C4S, 2, (64, 64), 1),
    cfg(2, 1, 2, [32, 64, 128], 1, (64, 64), 1),
    cfg(2, 1, 2, [32, 64, 128], 1, (96, 96), 1),
    cfg(3, 1, 3, C4S, 1, (16, 16, 16), 1),
    cfg(3, 1, 3, C4S, 1, (32, 32, 32), 1),
    cfg(3, 2, 2, C4T, 1, (24, 32, 40), 2),
    cfg(3, 1, 2, C4T, 2, (32, 32, 32), 1),
    cfg(3, 4, 4, C4T, 1, (32, 32, 32), 1),
    cfg(3, 1, 2, [16, 32, 64], 1, (32, 32, 32), 1),
    cfg(3, 1, 2, [8, 16, 32, 64, 128], 1, (32, 32, 32), 1),
]
# step 2
AMP_GRID = [
    cfg(2, 3, 2, C4, 1, (64, 64), 2),
    cfg(3, 1, 3, C4S, 1, (32, 32, 32), 1),
]
# step 3: real steps, small
OVERHEAD_FIT = [
    cfg(2, 3, 2, C4, 1, (96, 96), 2),
    cfg(3, 1, 3, C4S, 1, (40, 40, 40), 1),
]
# step 4: held out, what the issue asks for (>= 3 patch sizes, one 3D case)
VALIDATION = [
    cfg(2, 3, 2, C4, 1, (128, 128), 2),
    cfg(2, 3, 2, C4, 1, (192, 192), 2),
    cfg(2, 3, 2, C4, 1, (256, 256), 2),
    cfg(3, 1, 3, C4S, 1, (48, 48, 48), 1),
    cfg(3, 1, 3, C4S, 1, (64, 64, 64), 1),
]


def key(c: dict) -> str:
    patch = "x".join(map(str, c["patch_size"]))
    return (f"{c['spatial_dims']}d ch={'/'.join(map(str, c['channels']))} nrb={c['num_res_blocks']} "
            f"in={c['in_channels']} cls={c['num_classes']} patch={patch} b={c['batch_size']}")


def features_of(c: dict) -> dict:
    return activation_features(c["spatial_dims"], c["in_channels"], c["num_classes"], c["channels"],
                               c["num_res_blocks"], c["patch_size"], c["batch_size"])


def log(msg: str) -> None:
    print(msg, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(MEMORY_MODEL_PATH))
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS cross-check")
    parser.add_argument("--cuda", action="store_true", default=torch.cuda.is_available(),
                        help="also measure torch.cuda.max_memory_allocated (default: when a GPU is present)")
    args = parser.parse_args()
    t_start = time.time()
    torch.manual_seed(0)

    # 1. saved activations -> coefficients
    rows = []
    for c in FIT_GRID:
        t0 = time.time()
        saved = measure_saved_activations(**c)
        rows.append({"config": key(c), **c, "features": features_of(c), "saved_bytes": saved})
        log(f"[saved] {key(c)}: {saved / 2**20:.1f} MiB ({time.time() - t0:.1f}s)")
    a = np.array([[r["features"][k] for k in FEATURE_NAMES] for r in rows], dtype=np.float64)
    y = np.array([r["saved_bytes"] for r in rows], dtype=np.float64)
    w = 1.0 / y  # relative errors
    scale = a.max(axis=0)
    scale[scale == 0] = 1.0
    coef_scaled, _ = nnls(a * w[:, None] / scale, y * w)
    coef = coef_scaled / scale
    coefficients = {k: float(v) for k, v in zip(FEATURE_NAMES, coef)}
    for r in rows:
        r["predicted_bytes"] = predict_activation_bytes(r["features"], coefficients)
        r["relative_error"] = r["predicted_bytes"] / r["saved_bytes"] - 1.0
    log("coefficients (bytes per element): " + json.dumps({k: round(v, 3) for k, v in coefficients.items()}))
    log(f"fit residuals: max |rel err| = {max(abs(r['relative_error']) for r in rows):.3%}")

    # 2. amp ratio
    amp_rows = []
    for c in AMP_GRID:
        saved = measure_saved_activations(**c, amp=True)
        p = count_parameters(c["spatial_dims"], c["in_channels"], c["num_classes"], c["channels"], c["num_res_blocks"])
        fp32 = predict_activation_bytes(features_of(c), coefficients)
        amp_rows.append({"config": key(c), **c, "saved_bytes_amp": saved, "bf16_weight_copies": 2 * p,
                         "predicted_fp32_bytes": fp32, "ratio": (saved - 2 * p) / fp32})
        log(f"[amp] {key(c)}: {saved / 2**20:.1f} MiB, ratio {(saved - 2 * p) / fp32:.3f}")
    amp_ratio = float(np.mean([r["ratio"] for r in amp_rows]))

    # 3. overhead factor from real steps on small configurations
    over_rows = []
    for c in OVERHEAD_FIT:
        res = measure_training_peak(**c, method="profiler")
        p = count_parameters(c["spatial_dims"], c["in_channels"], c["num_classes"], c["channels"], c["num_res_blocks"])
        act = predict_activation_bytes(features_of(c), coefficients)
        over_rows.append({"config": key(c), **c, "parameters": p, "predicted_activations": act, **res})
        log(f"[overhead] {key(c)}: growth {res['delta'] / 2**20:.1f} MiB, predicted activations {act / 2**20:.1f} MiB "
            f"({res['step_seconds']:.1f}s)")
    x = np.array([r["predicted_activations"] for r in over_rows])
    d = np.array([r["delta"] for r in over_rows], dtype=np.float64)
    overhead = float((x * d).sum() / (x * x).sum())
    optimizer_factor = float(max(r["optimizer_delta"] / (4 * r["parameters"]) for r in over_rows))
    log(f"overhead_factor {overhead:.4f}, optimizer_factor {optimizer_factor:.4f}")

    model = {
        "description": "Peak training memory of MedSegDiffV2 (see medsegdiff_bundle/planning/memory.py). "
                       "Written by benchmarks/memory_fit.py.",
        "model_version": 1,
        "form": "total = 20P (weights+grads+AdamW+EMA, fp32) + max(overhead_factor * sum_k coef_k * feature_k, "
                "optimizer_factor * 4P); amp: activations * amp_activation_ratio + 2P",
        "feature_names": list(FEATURE_NAMES),
        "coefficients": coefficients,
        "coefficient_units": "bytes per element of the feature",
        "overhead_factor": overhead,
        "optimizer_factor": optimizer_factor,
        "amp_activation_ratio": amp_ratio,
        "notes": [
            "overhead_factor and optimizer_factor are CPU measurements; on GPU rerun this script (--cuda path) to "
            "check them against torch.cuda.max_memory_allocated.",
            "CPU PyTorch sends small 3D convolutions (input below ~1M elements) to the Slow3d im2col kernel, whose "
            "transient column buffer (C_in*27*V*4 bytes per sample) the model leaves out: 3D 32^3 with widths "
            "16/32/64/128 measured 1.47x its saved activations (178 MiB vs 121 MiB). cuDNN and the CPU mkldnn path "
            "used for larger inputs have no such buffer; the overhead configurations avoid that regime.",
            "amp_activation_ratio comes from CPU bf16 autocast, which also runs GroupNorm in bf16; CUDA autocast "
            "keeps normalisation outputs in fp32, so the GPU ratio is higher. The planner budgets with fp32.",
        ],
    }

    # 4. validation
    val_rows = []
    for c in VALIDATION:
        est = predict_training_memory(**c, model=model)
        res = measure_training_peak(**c, method="profiler", saved=True)
        measured = res["static"] + res["delta"]
        row = {"config": key(c), **c, "predicted": est.as_dict(), "predicted_total": est.total,
               "measured_profiler": res, "measured_total": measured,
               "relative_error": est.total / measured - 1.0,
               "activations_relative_error": est.activations / res["saved_bytes"] - 1.0}
        log(f"[validate] {key(c)}: predicted {est.total / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB "
            f"({row['relative_error']:+.2%}; activations {row['activations_relative_error']:+.2%}; "
            f"static {res['static'] / 2**20:.1f}, growth {res['delta'] / 2**20:.1f}, "
            f"{res['step_seconds']:.1f}s)")
        if not args.no_rss:
            rss = measure_training_peak(**c, method="rss")
            row["measured_rss"] = rss
            row["rss_total"] = res["static"] + rss["delta"]
            row["rss_vs_profiler_growth"] = rss["delta"] / res["delta"] - 1.0
            row["relative_error_rss"] = est.total / row["rss_total"] - 1.0
            log(f"           rss growth {rss['delta'] / 2**20:.1f} MiB ({row['rss_vs_profiler_growth']:+.2%} vs "
                f"profiler; prediction {row['relative_error_rss']:+.2%})")
        if args.cuda:
            try:
                cu = measure_training_peak(**c, method="cuda")
                row["measured_cuda"] = cu
                row["relative_error_cuda"] = est.total / cu["peak"] - 1.0
            except Exception as exc:  # keep the CPU results when the GPU path fails
                row["measured_cuda"] = {"error": repr(exc)[:500]}
        val_rows.append(row)

    model.update({
        "fit_measurements": rows,
        "fit_max_abs_relative_error": max(abs(r["relative_error"]) for r in rows),
        "amp_measurements": amp_rows,
        "overhead_measurements": over_rows,
        "validation": val_rows,
        "validation_max_abs_relative_error": max(abs(r["relative_error"]) for r in val_rows),
        "measurement": "CPU: torch.profiler(profile_memory=True) running sum of allocator events, fresh process per "
                       "configuration, after a tiny warm-up step (steady state: grads, AdamW moments, EMA exist); "
                       "cross-check: peak-RSS growth with MALLOC_MMAP_THRESHOLD_=65536",
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - t_start, 1),
    })
    out = Path(args.output)
    out.write_text(json.dumps(model, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {out} ({model['seconds']} s)")


if __name__ == "__main__":
    main()
