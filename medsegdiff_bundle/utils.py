"""Small helpers shared by the package."""

from __future__ import annotations

from typing import Any

__all__ = ["as_bool"]

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", "none", "null", ""}


def as_bool(value: Any, name: str = "value") -> bool:
    """Interpret a flag given as bool, number or string (``--amp true`` on the bundle command line arrives as the
    string ``"true"``, which plain ``bool()`` would also turn ``"false"`` into ``True``)."""
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"{name} must be true or false, got {value!r}.")
    return bool(value)
