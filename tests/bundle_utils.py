"""Helpers for running the bundle's configs in tests through MONAI's ``ConfigWorkflow``."""

from __future__ import annotations

from pathlib import Path

from monai.bundle import ConfigWorkflow

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
SHARED_DATA = REPO.parent / "shared" / "data"

TINY = {
    "channels": [8, 16, 32],
    "num_workers": 0,
    "amp": False,
}


def workflow(config: str, workflow_type: str, bundle_root: Path, **overrides) -> ConfigWorkflow:
    """An initialised ConfigWorkflow of ``bundle/configs/<config>.json`` rooted at ``bundle_root``."""
    wf = ConfigWorkflow(
        config_file=str(CONFIGS / f"{config}.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(bundle_root),
        **{**TINY, **overrides},
    )
    wf.initialize()
    return wf


def run_workflow(config: str, workflow_type: str, bundle_root: Path, **overrides) -> ConfigWorkflow:
    """Initialise, check the bundle properties, run and finalise a workflow."""
    wf = workflow(config, workflow_type, bundle_root, **overrides)
    missing = wf.check_properties()
    assert not missing, f"{config}: optional properties defined under the wrong id: {missing}"
    wf.run()
    wf.finalize()
    return wf
