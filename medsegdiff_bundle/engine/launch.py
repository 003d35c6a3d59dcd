"""Start bundle training from a plan: in this process, or with ``torchrun`` for several processes (DDP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .workflow import BUNDLE_CONFIGS, run_bundle

__all__ = ["torchrun_command", "launch_training"]


def _flag(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)


def torchrun_command(
    bundle_root: str | Path,
    overrides_file: str | Path | None,
    world_size: int,
    extra_configs: Sequence[str | Path] = (),
    **overrides: Any,
) -> list[str]:
    """The ``torchrun ... -m monai.bundle run training`` command line for ``world_size`` processes.

    The config list is ``train.json`` + ``multi_gpu_train.json`` (when ``world_size > 1``) + the plan's
    ``bundle_overrides.json`` + ``extra_configs`` (a user's own layers); ``overrides`` are appended as
    ``--key value`` flags (they win).
    """
    configs = [str(BUNDLE_CONFIGS / "train.json")]
    if world_size > 1:
        configs.append(str(BUNDLE_CONFIGS / "multi_gpu_train.json"))
    if overrides_file is not None:
        configs.append(str(overrides_file))
    configs += [str(c) for c in extra_configs]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
           "-m", "monai.bundle", "run", "training", "--config_file", json.dumps(configs),
           "--bundle_root", str(bundle_root)]
    for key, value in overrides.items():
        cmd += [f"--{key}", _flag(value)]
    return cmd


def launch_training(
    bundle_root: str | Path,
    overrides_file: str | Path | None = None,
    world_size: int = 1,
    extra_configs: Sequence[str | Path] = (),
    **overrides: Any,
) -> None:
    """Train with the bundle: in-process for one process, ``torchrun`` (gloo on CPU, nccl on GPUs) for more.

    ``extra_configs`` are further config files layered last (multi-process runs only, where configs are files).

    Raises:
        RuntimeError: when the torchrun job fails (its exit code is in the message; its output went to the console).
    """
    plan_overrides = json.loads(Path(overrides_file).read_text(encoding="utf-8")) if overrides_file else {}
    if world_size <= 1:
        if extra_configs:
            raise ValueError("extra_configs are only supported for multi-process (torchrun) training.")
        run_bundle("train", "train", bundle_root, **{**plan_overrides, **overrides})
        return
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = torchrun_command(bundle_root, overrides_file, world_size, extra_configs, **overrides)
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"distributed training ({world_size} processes) failed with exit code {result.returncode}.")
