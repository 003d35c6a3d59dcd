"""MONAI Label integration: an app (``label/app``) whose infer and train tasks serve the MedSegDiff-V2 bundle.

``medsegdiff_bundle.label.bundle`` needs only MONAI; ``medsegdiff_bundle.label.infer`` / ``.train`` and the app
need MONAI Label (``requirements-label.txt``, installed in its own virtualenv by ``scripts/setup_label_env.sh``).
"""

from pathlib import Path

APP_DIR = Path(__file__).resolve().parent / "app"

__all__ = ["APP_DIR"]
