"""The ``medsegdiff`` command (python-fire). ``medsegdiff <verb> --help`` documents each verb.

Verbs: ``demo``, ``datasets``, ``convert``, ``fingerprint``, ``plan``, ``train``, ``infer``, ``evaluate``, ``auto``,
``export-bundle``.
``train`` / ``infer`` / ``evaluate`` run the MONAI bundle's configs; any further ``--key value`` is a bundle
override (as with ``python -m monai.bundle run``).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import fire

__all__ = ["CLI", "main"]


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


class CLI:
    """MedSegDiff-V2 for MONAI: diffusion-based medical image segmentation in 2D and 3D."""

    def demo(self, output_dir: str = "demo_output", spatial_dims: int = 2, num_classes: int = 2, iterations: int = 600,
             sampler: str = "dpmpp", steps: int = 20, ensemble: int = 5, seed: int = 0, device: str | None = None) -> None:
        """Generate data, train with the MONAI bundle, evaluate the held-out cases: maps, overlays, metrics.

        Args:
            output_dir: results folder (the bundle root of the run).
            spatial_dims: 2 (RGB images, 64x64) or 3 (one-channel volumes, 32^3).
            num_classes: classes including background.
            iterations: approximate training iterations (whole epochs).
            sampler: dpmpp, ddim or ddpm.
            steps: sampler steps (ddpm needs 1000).
            ensemble: ensemble members per case.
            seed: random seed.
            device: cpu or cuda (default: cuda when available).
        """
        from .demo import run_demo

        summary = run_demo(output_dir=output_dir, spatial_dims=spatial_dims, num_classes=num_classes,
                           iterations=iterations, sampler=sampler, steps=steps, ensemble=ensemble, seed=seed,
                           device=device)
        _print(summary)
        print(f"\nDemo Dice on {summary['cases_evaluated']} held-out cases: {summary['dice_mean']:.4f} "
              f"(see {summary['output_dir']}/eval/evaluation/ for maps, overlays and metrics_summary.md)")

    def datasets(self) -> None:
        """List the datasets ``convert`` knows."""
        from .data.converters import list_datasets

        for name, description in list_datasets().items():
            print(f"{name:28s} {description}")

    def convert(self, dataset: str, src: str, dst: str, copy: bool = False, link: bool = False) -> None:
        """Turn a dataset's official raw layout into an MSD datalist with folds + an nnU-Net dataset.json.

        Args:
            dataset: a name from ``medsegdiff datasets``.
            src: the raw download.
            dst: output folder (datalist.json, dataset.json).
            copy: copy the files into dst (default: the datalist points into src).
            link: symlink the files into dst.
        """
        from .data.converters import convert

        print(convert(dataset, src, dst, copy=copy, link=link))

    def fingerprint(self, datalist: str, dataroot: str | None = None, output: str = "fingerprint",
                    label_threshold: float | None = None, num_workers: int = 2) -> None:
        """Measure a dataset: spacing, shapes, foreground intensities, classes (fingerprint.json + CSV).

        Args:
            datalist: MSD-style datalist.
            dataroot: base folder of the datalist's relative paths.
            output: folder for fingerprint.json and fingerprint_cases.csv.
            label_threshold: binarise 0/255 masks at this value.
            num_workers: parallel workers.
        """
        from .planning.fingerprint import extract_fingerprint, save_fingerprint

        fp = extract_fingerprint(datalist, dataroot, label_threshold=label_threshold, num_workers=num_workers)
        print(save_fingerprint(fp, output))

    def plan(self, fingerprint: str, output: str = "plans", gpu_memory_gb: float = 24.0, gpus: int | None = None) -> None:
        """Derive the training plan (plans.json) and the bundle override file from a fingerprint.

        Args:
            fingerprint: fingerprint.json.
            output: folder for plans.json and bundle_overrides.json.
            gpu_memory_gb: GPU memory budget per process.
            gpus: GPUs to plan DDP for (default: the visible ones).
        """
        from .planning.fingerprint import load_fingerprint
        from .planning.planner import plan_dataset, save_plans

        plans = plan_dataset(load_fingerprint(fingerprint), gpu_memory_gb=gpu_memory_gb, gpus=gpus)
        print(save_plans(plans, output))

    def train(self, bundle_root: str = ".", plans: str | None = None, gpus: int | None = None, **overrides: Any) -> None:
        """Train with the bundle (``torchrun`` when more than one process), optionally from a plan folder.

        Args:
            bundle_root: where checkpoints and logs go.
            plans: a folder with plans.json + bundle_overrides.json from ``medsegdiff plan``.
            gpus: processes (default: the plan's world size, else 1).
            overrides: further bundle keys, e.g. --datalist FILE --max_epochs 10 --resume true.
        """
        from pathlib import Path

        from .engine.launch import launch_training

        overrides_file = None
        world_size = gpus or 1
        if plans is not None:
            overrides_file = Path(plans) / "bundle_overrides.json"
            if gpus is None:
                world_size = json.loads((Path(plans) / "plans.json").read_text(encoding="utf-8"))["ddp"]["world_size"]
        launch_training(bundle_root, overrides_file, int(world_size), **overrides)

    def infer(self, bundle_root: str = ".", **overrides: Any) -> None:
        """Run bundle inference (label map, uncertainty map, overlay per case; failed_cases.csv).

        Args:
            bundle_root: the trained bundle root (models/model.pt).
            overrides: bundle keys, e.g. --input_dir FOLDER or --datalist FILE --datalist_key testing --fold None.
        """
        from .engine.workflow import run_bundle

        run_bundle("inference", "infer", bundle_root, **overrides)

    def evaluate(self, bundle_root: str = ".", **overrides: Any) -> None:
        """Run bundle evaluation (metrics.csv per case and class, metrics_summary.md).

        Args:
            bundle_root: the trained bundle root (models/model.pt).
            overrides: bundle keys, e.g. --datalist FILE --fold 0.
        """
        from .engine.workflow import run_bundle

        run_bundle("evaluate", "infer", bundle_root, **overrides)

    def auto(self, datalist: str, dataroot: str | None = None, output: str = "auto_output",
             time_budget: float | None = None, gpu_memory_gb: float | None = None, gpus: int | None = None,
             label_threshold: float | None = None, max_epochs: int | None = None, **overrides: Any) -> None:
        """Fingerprint -> plan -> train -> evaluate; run it again to continue where it stopped.

        Args:
            datalist: MSD-style datalist with folds.
            dataroot: base folder of the datalist's relative paths.
            output: working folder.
            time_budget: training minutes (stops after the first epoch past it; resumable).
            gpu_memory_gb: memory budget for planning (default: the GPU's, or 8 GB on CPU).
            gpus: processes to train with.
            label_threshold: binarise 0/255 masks at this value.
            max_epochs: training epochs.
            overrides: further bundle keys.
        """
        from .auto import run_auto

        _print(run_auto(datalist, dataroot, output, time_budget, gpu_memory_gb, gpus, label_threshold, max_epochs,
                        **overrides))

    def export_bundle(self, out: str = "dist", name: str = "medsegdiff_v2", weights: str | None = None) -> None:
        """Write a self-contained MONAI Model-Zoo bundle: the folder <out>/<name>/ and <out>/<name>.zip.

        The package's code is vendored under scripts/medsegdiff_bundle/ (the configs reference
        scripts.medsegdiff_bundle), so the bundle runs with the Model Zoo's requirements only; run it from its folder.

        Args:
            out: output folder.
            name: bundle name (folder and zip name).
            weights: a model.pt to ship as models/model.pt (default: none; large_files.yml says where it would come from).
        """
        from .export import export_bundle

        folder, zip_path = export_bundle(out=out, name=name, weights=weights)
        _print({"folder": str(folder), "zip": str(zip_path)})


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``medsegdiff`` console script."""
    fire.Fire(CLI(), command=argv if argv is not None else sys.argv[1:], name="medsegdiff")


if __name__ == "__main__":
    main()
