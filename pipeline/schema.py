"""The config schema's field metadata: a dataclass field's allowed values or range, which the YAML loader
(pipeline/config.py) checks and names in its one-line errors. Its own module so that a section's dataclass
can live beside the code that owns it (LossSpec in pipeline/losses/spec.py) without importing the loader."""

from __future__ import annotations


def choice(*values: str) -> dict:
    """Field metadata: the value must be one of `values`."""
    return {"choices": values}


def bounded(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> dict:
    """Field metadata: lo <= value <= hi (strict where open; None = unbounded on that side)."""
    return {"range": (lo, hi, lo_open, hi_open)}
