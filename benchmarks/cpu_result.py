"""The result header and writer shared by the CPU benchmarks (``epoch_overhead.py``, ``data_cache.py``).

Importing it also puts the repository root on ``sys.path``, so the scripts run from a source checkout without
installing the package (Python puts the script's own folder, and so this module, on the path).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

__all__ = ["cpu_result", "write_result"]


def cpu_result(benchmark: str, args: argparse.Namespace, **fields: Any) -> dict:
    """``benchmark``, the machine (processor and core count), torch version, date and the run's settings, then
    ``fields``."""
    import torch

    return {
        "benchmark": benchmark,
        "device": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)",
        "torch_version": torch.__version__,
        "date": _dt.date.today().isoformat(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **fields,
    }


def write_result(result: dict, out: Path | None) -> None:
    """Write ``result`` as indented JSON to ``out`` (its folder created); nothing when ``out`` is ``None``."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
