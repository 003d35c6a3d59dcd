"""The ``medsegdiff`` command (python-fire). ``medsegdiff <verb> --help`` documents each verb."""

from __future__ import annotations

import json
import sys

import fire

__all__ = ["CLI", "main"]


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
        print(json.dumps(summary, indent=2))
        print(f"\nDemo Dice on {summary['cases_evaluated']} held-out cases: {summary['dice_mean']:.4f} "
              f"(see {summary['output_dir']}/eval/evaluation/ for maps, overlays and metrics_summary.md)")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``medsegdiff`` console script."""
    fire.Fire(CLI, command=argv if argv is not None else sys.argv[1:], name="medsegdiff")


if __name__ == "__main__":
    main()
