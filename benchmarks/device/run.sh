#!/usr/bin/env bash
# Run ON the lent GPU machine, in the repository root (see benchmarks/device/README.md for the exact calls):
#
#   bash benchmarks/device/run.sh speed tests     # call 1: speed benchmark + tests/test_gpu.py
#   bash benchmarks/device/run.sh quality         # call 2: Kvasir-SEG quality benchmark
#   OUT=/tmp/out DEVICE=cpu bash benchmarks/device/run.sh smoke   # here, on CPU: the same steps with tiny settings
#
# Needs .whl/ and .carry/Kvasir-SEG (benchmarks/device/prepare.sh) carried with the call. Writes at most 8 files per
# call under $OUT (what the device tool brings back); each stage has its own time limit so that a slow stage cannot
# eat the next one. Exit status: non-zero if any stage failed; the others still run.
#
# Settings (environment): OUT (required), DEVICE (cuda), CALL_SECONDS (500: deadline of the speed/tests stages),
# TESTS_K (pytest -k of the tests stage; empty: all), QUALITY_SECONDS (450), QUALITY_MINUTES (2: training budget per
# model), QUALITY_LR (1e-3: MedSegDiff-V2's learning rate), QUALITY_BATCH (32: both models), QUALITY_ITERS_PER_EPOCH
# (100: both models), DDPM_CASES (5: DDPM-1000 takes about 1000 x 25 ms per case eagerly), EVAL_COMPILE_MODE
# (reduce-overhead: the sampling of quality passes 2 and 3; empty: eager), TRAJECTORY_CASES (30: Dice after every
# sampler step, next to the anchor's), QUALITY_EXTRA (more quality.py arguments for all passes, e.g. --skip-baseline
# when a session's device time allows MedSegDiff-V2 alone), KEEP_WEIGHTS (0; 1: bring the trained diffusion model's
# EMA weights back even when it was scored, three files), WHEEL_DIR (.whl).
set -uo pipefail

STAGES=("$@")
[ ${#STAGES[@]} -gt 0 ] || { echo "usage: run.sh speed|tests|quality|smoke ..." >&2; exit 2; }
: "${OUT:?set OUT to the folder whose files come back}"
DEVICE="${DEVICE:-cuda}"
CALL_SECONDS="${CALL_SECONDS:-500}"
QUALITY_SECONDS="${QUALITY_SECONDS:-450}"
QUALITY_MINUTES="${QUALITY_MINUTES:-2}"
DDPM_CASES="${DDPM_CASES:-5}"
TRAJECTORY_CASES="${TRAJECTORY_CASES:-30}"
WHEEL_DIR="${WHEEL_DIR:-.whl}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
START=$SECONDS
FAILED=()
SUMMARY=()

note() { echo "[run.sh $((SECONDS - START))s] $*"; }
left() { echo $(($1 - (SECONDS - START))); }  # seconds left before deadline $1 (seconds since start)
cap() { local l; l=$(left "$1"); echo $((l < $2 ? l : $2)); }  # seconds left before deadline $1, at most $2

# ---------------------------------------------------------------------------------------------------- setup
# The carried wheels go to /tmp/site (kept between calls while the machine stays warm: installed once).
if ls "$WHEEL_DIR"/*.whl >/dev/null 2>&1; then
    stamp="/tmp/site/.installed-$(cat "$WHEEL_DIR"/*.whl | md5sum | cut -c1-12)"
    if [ ! -e "$stamp" ]; then
        note "installing $(ls "$WHEEL_DIR" | tr '\n' ' ')into /tmp/site"
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$WHEEL_DIR"/*.whl || { echo "wheel install failed" >&2; exit 1; }
        touch "$stamp"
    fi
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    note "no wheels in $WHEEL_DIR: using the installed packages"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
{
    python3 - <<'PY'
import platform, sys
import torch, monai, ignite
import medsegdiff_bundle
print("python", platform.python_version(), "| torch", torch.__version__, "| monai", monai.__version__,
      "| ignite", ignite.__version__, "| medsegdiff_bundle", medsegdiff_bundle.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
PY
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    git log --oneline -1 2>/dev/null || true
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
python3 -c "import medsegdiff_bundle.engine, medsegdiff_bundle.diffusion" || { echo "package import failed" >&2; exit 1; }

run_step() {  # run_step NAME SECONDS LOG CMD...: run CMD with a time limit, log to LOG (appended), record the result
    local name=$1 limit=$2 log=$3
    shift 3
    if [ "$limit" -lt 20 ]; then
        note "$name: skipped, only ${limit}s left"
        SUMMARY+=("$name: skipped (time)")
        return
    fi
    note "$name: up to ${limit}s: $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    SUMMARY+=("$name: rc=$rc in $((SECONDS - t0))s")
    [ "$rc" -eq 0 ] || FAILED+=("$name")
}

# --------------------------------------------------------------------------------------------------- stages
speed() {  # call 1. Three runs of speed.py on the default preset at 256^2 with the bundle's CUDA settings (bf16,
           # default layout: channels-last measured slower on an H200, 0.573 against 0.474 s per image; test-time
           # mirroring, the bundle's default since 0.6.0: the condition UNet runs on the four views at once):
           #   speed.json          eager; training at batches 8-32 (reported: the fastest within 12 GB); profile
           #   speed_fp32norm.json the same with --fp32-norm (torch's GroupNorm, which CUDA autocast runs in fp32, as
           #                       before 0.3.0) at batch 24 only: the A/B of the package's GroupNorm in one session
           #   speed_graphs.json   the inferer's compile_mode="reduce-overhead" (inductor + CUDA-graph replay; 0.064
           #                       against 0.500 s per image in the second H200 session). No profile, so that a
           #                       profiler problem with graphs cannot cost the numbers
           # (compile_mode="default" for training is not measured here: compiling forward + backward did not finish
           # within 158 s in the second session)
    local deadline=$1 base=(--preset default --device "$DEVICE" --amp --mirror) batches=(8 16 24 32) ab=(24)
    local more=(--repeats 10 --reference-steps-measured 40)
    if [ "$DEVICE" = cpu ]; then  # the smoke run: the same code paths at toy sizes (aot_eager: no C++ compiler needed)
        base=(--preset small --device cpu --amp --mirror --size 32 --compile-backend aot_eager)
        batches=(2 3) ab=(2)
        more=(--train-iters 2 --train-warmup 1 --steps 2 --repeats 1 --reference-steps-measured 2)
    fi
    run_step speed "$(cap "$deadline" 100)" "$OUT/speed.log" \
        python3 benchmarks/speed.py "${base[@]}" "${more[@]}" --train-batch "${batches[@]}" --profile 1 \
        --out "$OUT/speed.json"
    run_step speed-fp32norm "$(cap "$deadline" 70)" "$OUT/speed.log" \
        python3 benchmarks/speed.py "${base[@]}" "${more[@]}" --fp32-norm --train-batch "${ab[@]}" \
        --out "$OUT/speed_fp32norm.json"
    run_step speed-graphs "$(cap "$deadline" 110)" "$OUT/speed.log" \
        python3 benchmarks/speed.py "${base[@]}" "${more[@]}" --compile --compile-mode reduce-overhead --skip-train \
        --out "$OUT/speed_graphs.json"
    # graphs without inductor (compile_backend="cudagraphs"): no fusion, but no launch gaps and a short first call,
    # which could make graphs a safe default for CUDA inference. CUDA only, so not in the CPU smoke run
    [ "$DEVICE" = cpu ] || run_step speed-cudagraphs "$(cap "$deadline" 70)" "$OUT/speed.log" \
        python3 benchmarks/speed.py "${base[@]}" "${more[@]}" --compile --compile-backend cudagraphs --skip-train \
        --out "$OUT/speed_cudagraphs.json"
}

tests() {  # the CUDA-only tests (they skip on CPU: the smoke run checks that they collect with the carried wheels).
           # TESTS_K selects some (pytest -k), e.g. the compile tests after a change to the compiled path only
    local limit k=()
    limit=$(left "$1")  # last in call 1 (all 16 took 166 s on an H200)
    [ -n "${TESTS_K:-}" ] && k=(-k "$TESTS_K")
    run_step tests "$limit" "$OUT/tests.log" \
        python3 -m pytest tests/test_gpu.py -v -rs --durations=0 -p no:cacheprovider ${k[@]+"${k[@]}"}
}

quality() {  # both models for QUALITY_MINUTES each, scored on the fixed test split; then DDPM-1000 on DDPM_CASES
    local deadline=$1 common=(--data .carry/Kvasir-SEG) root=runs/quality
    if [ "$DEVICE" = cpu ]; then  # the smoke run: 12 + 4 cases at 64^2, in a scratch folder
        root=/tmp/quality_smoke
        rm -rf "$root"
        common+=(--smoke --output "$root" --iterations-per-epoch 2)
    else
        common+=(--output "$root")
        # lr 1e-3 as in the CPU budget runs: at the bundle's 1e-4 the first H200 run (2 min, 649 iterations) left the
        # model far from trained (sampled Dice 0.288 against DynUNet's 0.728)
        # 100-batch epochs for both models: Kvasir-SEG's one-pass epochs are 30 batches of 16, and each epoch end cost
        # the bundle ~1.7 s of loader restart and checkpoint (a quarter of the training time in the second session)
        # batch 32 for both models since the fifth session: on the H100 the diffusion model's step is bound by the
        # host (85-106 ms at batch 8-32, speed.py), so 32 trains 1.7x the images per second of 16 within 10.3 GiB
        common+=(--minutes "$QUALITY_MINUTES" --lr "${QUALITY_LR:-1e-3}" --batch-size "${QUALITY_BATCH:-32}"
                 --iterations-per-epoch "${QUALITY_ITERS_PER_EPOCH:-100}")
    fi
    # shellcheck disable=SC2206  # word splitting wanted: several arguments in one variable
    [ -n "${QUALITY_EXTRA:-}" ] && common+=(${QUALITY_EXTRA})
    # pass 1 without the DDPM comparison, so that the main result is written even if the DDPM pass is cut short
    run_step quality "$(left "$deadline")" "$OUT/quality.log" \
        python3 benchmarks/quality.py "${common[@]}" --out "$OUT/quality.json"
    # cut short after the diffusion model's training (the fifth session lost its evaluation so), or asked for with
    # KEEP_WEIGHTS=1 (to study the trained model on the CPU here: its training cases, its failures): bring its EMA
    # weights back in parts under the tool's 16 MiB per file (device/README.md)
    if { [ ! -s "$OUT/quality.json" ] || [ "${KEEP_WEIGHTS:-0}" = 1 ]; } &&
        grep -qs '"done": true' "$root/medsegdiff/train_state.json"; then
        python3 benchmarks/device/weights.py split "$root/medsegdiff" "$OUT" || echo "weights: split failed" >&2
    fi
    # the baseline alone (a session of its own at a long budget): passes 2 and 3 are about the diffusion model
    case " ${QUALITY_EXTRA:-} " in
        *" --skip-medsegdiff "*) SUMMARY+=("quality-ddpm, quality-anchor: not run (--skip-medsegdiff)"); return ;;
    esac
    # pass 2 resumes (trained models and finished evaluations are skipped) and adds DDPM-1000 on the first cases and
    # the per-step trajectory
    # one part for all DDPM cases: each part loads (and compiles) the model anew, ~40 s with CUDA graphs
    local more=(--compare-ddpm --ddpm-cases "$DDPM_CASES" --ddpm-part "$DDPM_CASES" --trajectory "$TRAJECTORY_CASES")
    # DDPM-1000 is 1000 denoiser calls per case: replayed as CUDA graphs a call took 3.2 ms on an H200 against ~25 ms
    # eagerly (speed_graphs.json), which pays the ~40 s of compiling within the first two cases
    if [ "$DEVICE" != cpu ] && [ -n "${EVAL_COMPILE_MODE-reduce-overhead}" ]; then
        more+=(--compile-mode "${EVAL_COMPILE_MODE-reduce-overhead}")
    fi
    run_step quality-ddpm "$(left "$deadline")" "$OUT/quality.log" \
        python3 benchmarks/quality.py "${common[@]}" "${more[@]}" --out "$OUT/quality_ddpm.json"
    # pass 3, last because it matters least: the anchor blend chosen on the validation fold and the test cases scored
    # with it (the unblended result stays in its ensemble_only entry)
    run_step quality-anchor "$(left "$deadline")" "$OUT/quality.log" \
        python3 benchmarks/quality.py "${common[@]}" "${more[@]}" --anchor-weight select --out "$OUT/quality_anchor.json"
}

for stage in "${STAGES[@]}"; do
    case "$stage" in
        speed) speed "$CALL_SECONDS" ;;
        tests) tests "$CALL_SECONDS" ;;
        quality) quality "$QUALITY_SECONDS" ;;
        smoke)
            speed "$CALL_SECONDS"
            tests "$CALL_SECONDS"
            quality "$QUALITY_SECONDS"
            ;;
        *) echo "unknown stage $stage (speed|tests|quality|smoke)" >&2; exit 2 ;;
    esac
done

echo
note "summary"
printf '  %s\n' "${SUMMARY[@]}"
python3 - "$OUT" <<'PY' || true
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for name in ("speed.json", "speed_fp32norm.json", "speed_graphs.json", "speed_cudagraphs.json"):
    p = out / name
    if p.is_file():
        r = json.loads(p.read_text())
        s, nan = r["settings"], float("nan")
        print(f"  {name}{'' if r.get('complete') else ' (cut short: the phases measured before)'}: {r['device']}: "
              f"fast path {r.get('ensemble_latency_s', nan):.4f} s/image (ensemble {s['ensemble']}, "
              f"{s['steps']} steps, amp={s['amp']}, channels_last={s['channels_last']}, "
              f"compile={s['compile_backend'] + '/' + s['compile_mode'] if s['compile'] else False}, "
              f"fp32_norm={s.get('fp32_norm')}), reference "
              f"{r.get('reference_latency_s', nan):.2f} s/image, speed-up {r.get('speedup', nan):.0f}x, "
              f"training {r.get('train_img_per_s', nan):.1f} img/s, peak {r.get('train_peak_mem_gb', nan):.2f} GB")
        for run in r["phases"].get("train_by_batch", []):
            print(f"    train batch {run['batch']}: {run['img_per_s']:.1f} img/s at {run['peak_mem_gb']:.2f} GB")
        prof = r["phases"].get("fast", {}).get("profile")
        if prof:
            print("    fast-path time by kind: " + ", ".join(f"{k} {v['percent']:.0f}%" for k, v in prof["by_kind"].items()))
for name in ("quality.json", "quality_ddpm.json", "quality_anchor.json"):
    p = out / name
    if p.is_file():
        r = json.loads(p.read_text())
        line = (f"  {name}: Dice MedSegDiff-V2 {r.get('dice_medsegdiff', float('nan')):.4f} vs DynUNet "
                f"{r.get('dice_baseline', float('nan')):.4f} (train min {r['train_minutes']})")
        if r.get("anchor_weight"):
            line += f"; anchor_weight {r['anchor_weight']:g}, the ensemble alone {r['ensemble_only']['dice']:.4f}"
        if r.get("training_loop_medsegdiff"):
            loop = r["training_loop_medsegdiff"]
            line += (f"; bundle loop {loop['images_per_s']:.0f} img/s, "
                     f"{100 * loop['data_wait_fraction']:.0f} % loader wait")
        if "ddpm" in r:
            line += f"; first {r['ddpm']['cases']}: DDPM-1000 {r['ddpm']['dice_ddpm1000']:.4f} vs fast {r['ddpm']['dice_fast']:.4f}"
        print(line)
PY
ls -la "$OUT"
if [ ${#FAILED[@]} -gt 0 ]; then
    note "failed: ${FAILED[*]}"
    exit 1
fi
