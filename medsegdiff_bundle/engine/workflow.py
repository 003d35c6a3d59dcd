"""Running the package's MONAI bundle configs from Python (the demo, the CLI and the tests use this)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from monai.bundle import ConfigWorkflow

__all__ = ["BUNDLE_CONFIGS", "bundle_workflow", "run_bundle"]

BUNDLE_CONFIGS = Path(__file__).resolve().parents[2] / "bundle" / "configs"


def bundle_workflow(config: str, workflow_type: str, bundle_root: str | Path, **overrides: Any) -> ConfigWorkflow:
    """An initialised ``ConfigWorkflow`` of ``bundle/configs/<config>.json`` with ``bundle_root`` and overrides.

    Args:
        config: ``train``, ``inference`` or ``evaluate``.
        workflow_type: ``train`` or ``infer`` (which bundle properties apply).
        bundle_root: where the run writes ``models/``, ``eval/`` (and synthetic ``data/``).
        overrides: config keys to replace, as on the ``python -m monai.bundle run`` command line.
    """
    wf = ConfigWorkflow(
        config_file=str(BUNDLE_CONFIGS / f"{config}.json"),
        meta_file=str(BUNDLE_CONFIGS / "metadata.json"),
        logging_file=str(BUNDLE_CONFIGS / "logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(bundle_root),
        **overrides,
    )
    wf.initialize()
    return wf


def run_bundle(config: str, workflow_type: str, bundle_root: str | Path, **overrides: Any) -> ConfigWorkflow:
    """Initialise, run and finalise a bundle workflow (see :func:`bundle_workflow`)."""
    wf = bundle_workflow(config, workflow_type, bundle_root, **overrides)
    wf.run()
    wf.finalize()
    return wf
