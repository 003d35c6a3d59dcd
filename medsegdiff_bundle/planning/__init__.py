"""Planning: dataset fingerprinting (nnU-Net style) that training plans are derived from."""

from .fingerprint import FINGERPRINT_VERSION, extract_fingerprint, load_fingerprint, save_fingerprint

__all__ = ["FINGERPRINT_VERSION", "extract_fingerprint", "load_fingerprint", "save_fingerprint"]
