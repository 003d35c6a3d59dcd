"""The ``medsegdiff`` command (python-fire). ``medsegdiff <verb> --help`` documents each verb."""

from __future__ import annotations

import json
import sys

import fire

__all__ = ["CLI", "main"]


class CLI:
    """MedSegDiff-V2 for MONAI: diffusion-based medical image segmentation in 2D and 3D."""

    def demo(self, output_dir: str = "demo_output", spatial_dims: int = 2, num_classes: int = 2, iterations: int = 600,
             prediction_type: str = "sample", sampler: str = "dpmpp", steps: int = 20, ensemble: int = 5, seed: int = 0, device: str | None = None) -> None:
        """Train a small model on generated data, sample held-out cases, write predictions, maps, overlays, metrics.

        Args:
            output_dir: results folder.
            spatial_dims: 2 (RGB images, 64x64) or 3 (one-channel volumes, 32^3).
            num_classes: classes including background.
            iterations: training iterations.
            prediction_type: network target, sample (x0) or epsilon (noise, as in the paper).
            sampler: dpmpp, ddim or ddpm.
            steps: sampler steps (ddpm needs 1000).
            ensemble: ensemble members per case.
            seed: random seed.
            device: cpu or cuda (default: cuda when available).
        """
        from .demo import run_demo

        summary = run_demo(output_dir=output_dir, spatial_dims=spatial_dims, num_classes=num_classes,
                           iterations=iterations, prediction_type=prediction_type, sampler=sampler, steps=steps, ensemble=ensemble, seed=seed,
                           device=device)
        print(json.dumps(summary, indent=2))
        print(f"\nDemo Dice on {summary['output_dir']}: {summary['dice_mean']:.4f} "
              f"(metrics_summary.md, overlays/ and predictions/ hold the details)")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``medsegdiff`` console script."""
    fire.Fire(CLI, command=argv if argv is not None else sys.argv[1:], name="medsegdiff")


if __name__ == "__main__":
    main()
