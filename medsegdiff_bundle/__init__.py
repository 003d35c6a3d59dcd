"""medsegdiff_bundle: MedSegDiff-V2 diffusion segmentation for MONAI (2D and 3D)."""

__version__ = "0.1.0"
