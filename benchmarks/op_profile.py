"""Where the time of a call goes: a ``torch.profiler`` run summarised by operator and by operator kind.

``speed.py --profile N`` uses it on the fast path, so that a missed latency target comes with a profile (which kind
of work dominates), not a guess. On CPU the operators' own (self) CPU time is counted; on CUDA the kernels' own
device time. Kinds are assigned by name (approximate: e.g. cuDNN may run a convolution as a GEMM kernel).

Up to 2026-11-26 the CUDA summary also counted the aten operators, whose self device time is that of the kernels they
launch, so every kernel was counted about twice (``total_ms`` near double the kernels' time; the shares by kind
roughly held, since an operator and its kernels mostly fall in one kind). The result files of the H200 sessions and
of the first H100 session carry that total.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch

__all__ = ["KINDS", "op_kind", "timed_rows", "profile_ops"]

# checked in this order; the first pattern that matches a (lower-cased) operator or kernel name wins
KINDS: tuple[tuple[str, str], ...] = (
    ("fft", r"fft"),
    # CUDA GroupNorm runs as RowwiseMoments / ComputeFusedParams kernels
    ("normalization", r"group_norm|layer_norm|groupnorm|layernorm|batch_norm|rowwisemoments|fusedparams"),
    ("attention", r"scaled_dot_product|flash|attention|_efficient_attention|softmax"),
    ("convolution", r"conv|winograd|implicit_gemm|fprop|dgrad|wgrad"),
    ("matmul", r"gemm|addmm|bmm|matmul|\bmm\b|aten::mm|linear|cutlass"),
    ("copy / layout", r"copy|contiguous|to_copy|clone|cat|pad|permute|transpose"),
)


def op_kind(name: str) -> str:
    """The kind of an operator or kernel name (``"other"`` when no pattern matches)."""
    lowered = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, lowered):
            return kind
    return "other"


def timed_rows(events: Iterable, cuda: bool) -> list[dict]:
    """``{"name", "kind", "us", "count"}`` per profiler event (``key_averages()`` entries) that took time.

    On CPU, each operator's self CPU time. On CUDA, the device events only (the kernels, memcpy and memset), as
    torch's own profiler table totals them: kineto gives a kernel's time both to the kernel's event and to the self
    device time of the aten operator that launched it, so counting both would count it twice.
    """
    from torch.autograd import DeviceType

    rows = []
    for event in events:
        if cuda and (event.device_type != DeviceType.CUDA or getattr(event, "is_user_annotation", False)):
            continue
        us = float(event.self_device_time_total if cuda else event.self_cpu_time_total)
        if us > 0:
            rows.append({"name": event.key, "kind": op_kind(event.key), "us": us, "count": int(event.count)})
    return rows


def profile_ops(call: Callable[[], object], device: torch.device, calls: int = 1, top: int = 15) -> dict:
    """Profile ``calls`` runs of ``call()`` (already warmed up by the caller).

    Returns ``{"calls", "time_kind", "total_ms", "by_kind": {kind: {"ms", "percent"}}, "top_ops": [{"name", "kind",
    "ms", "percent", "count"}]}`` with times per call, kinds sorted by time.
    """
    from torch.profiler import ProfilerActivity, profile

    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}.")
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            call()
        if cuda:
            torch.cuda.synchronize(device)
    rows = timed_rows(prof.key_averages(), cuda)
    total_us = sum(r["us"] for r in rows) or 1.0
    by_kind: dict[str, float] = {}
    for r in rows:
        by_kind[r["kind"]] = by_kind.get(r["kind"], 0.0) + r["us"]
    rows.sort(key=lambda r: r["us"], reverse=True)
    return {
        "calls": calls,
        "time_kind": "self CUDA kernel time" if cuda else "self CPU time",
        "total_ms": total_us / 1000.0 / calls,
        "by_kind": {k: {"ms": us / 1000.0 / calls, "percent": 100.0 * us / total_us}
                    for k, us in sorted(by_kind.items(), key=lambda kv: kv[1], reverse=True)},
        "top_ops": [{"name": r["name"], "kind": r["kind"], "ms": r["us"] / 1000.0 / calls,
                     "percent": 100.0 * r["us"] / total_us, "count": r["count"] // calls} for r in rows[:top]],
    }
