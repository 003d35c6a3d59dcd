"""``python -m medsegdiff_bundle <verb>``."""

from .cli import main

main()
