"""Helpers for running the bundle's configs in tests through MONAI's ``ConfigWorkflow``."""

from __future__ import annotations

from pathlib import Path

from monai.bundle import ConfigWorkflow

from medsegdiff_bundle.engine.workflow import BUNDLE_CONFIGS as CONFIGS
from medsegdiff_bundle.engine.workflow import bundle_workflow

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

TINY = {"channels": [8, 16, 32], "num_workers": 0, "amp": False}

__all__ = ["CONFIGS", "REPO", "SHARED_DATA", "TINY", "workflow", "run_workflow"]


def workflow(config: str, workflow_type: str, bundle_root: Path, **overrides) -> ConfigWorkflow:
    """An initialised workflow with tiny CPU settings unless overridden."""
    return bundle_workflow(config, workflow_type, bundle_root, **{**TINY, **overrides})


def run_workflow(config: str, workflow_type: str, bundle_root: Path, **overrides) -> ConfigWorkflow:
    """Initialise, check the Model-Zoo bundle properties, run and finalise a workflow."""
    wf = workflow(config, workflow_type, bundle_root, **overrides)
    missing = wf.check_properties()
    assert not missing, f"{config}: optional properties defined under the wrong id: {missing}"
    wf.run()
    wf.finalize()
    return wf
