"""Bring a trained model's EMA weights back from a lent GPU machine, in parts that fit the device tool's limits.

Files come back from ``$OUT`` at most 16 MiB each (8 files per call), and the default MedSegDiff-V2's fp32 weights
take 44 MB. When a session's device time ends after training but before the test evaluation (the fifth session),
the trained model is saved this way and evaluated here, on the CPU, by ``quality.py`` (see README.md)::

    python3 benchmarks/device/weights.py split runs/quality/medsegdiff "$OUT"            # on the GPU machine
    python3 benchmarks/device/weights.py join /work/.device/N/ema_part*.pt ROOT/models/final_ema.pt   # here

``split`` takes the bundle root's ``models/final_ema.pt``, or else the EMA of its newest training checkpoint (as
``quality.py`` evaluates it, but without writing ``final_ema.pt``, which a later evaluation would then take for the
final weights); ``join`` refuses a parameter given twice.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

PART_BYTES = 15_000_000  # below the tool's 16 MiB per file


def _quality():
    spec = importlib.util.spec_from_file_location("quality_benchmark", Path(__file__).resolve().parents[1] / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def split(root: Path, out: Path, part_bytes: int = PART_BYTES) -> list[Path]:
    """Write the EMA state dict of the bundle root ``root`` as ``out/ema_part<i>.pt``, each at most ``part_bytes``
    of tensor data (a single larger tensor gets a part of its own). Returns the files written."""
    final = root / "models" / "final_ema.pt"
    state = (torch.load(final, map_location="cpu", weights_only=True) if final.is_file()
             else _quality().ema_state_dict(root))
    parts: list[dict] = [{}]
    size = 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if parts[-1] and size + nbytes > part_bytes:
            parts.append({})
            size = 0
        parts[-1][key] = value
        size += nbytes
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"ema_part{i}.pt" for i in range(len(parts))]
    for part, path in zip(parts, paths):
        torch.save(part, path)
    return paths


def join(parts: list[Path], target: Path) -> int:
    """Merge the parts into one state dict at ``target`` (written atomically). Returns the number of tensors.

    Raises:
        ValueError: a key occurs in two parts.
    """
    from medsegdiff_bundle.engine import atomic_save

    state: dict = {}
    for path in parts:
        part = torch.load(path, map_location="cpu", weights_only=True)
        twice = sorted(set(part) & set(state))
        if twice:
            raise ValueError(f"{path}: {twice[:3]} already came with an earlier part.")
        state.update(part)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(state, target)
    return len(state)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split", help="bundle root -> OUT/ema_part<i>.pt")
    s.add_argument("root", type=Path)
    s.add_argument("out", type=Path)
    j = sub.add_parser("join", help="parts -> one state dict")
    j.add_argument("parts", type=Path, nargs="+")
    j.add_argument("target", type=Path)
    args = p.parse_args(argv)
    if args.command == "split":
        print("\n".join(str(path) for path in split(args.root, args.out)))
    else:
        print(f"{join(args.parts, args.target)} tensors -> {args.target}")


if __name__ == "__main__":
    main()
