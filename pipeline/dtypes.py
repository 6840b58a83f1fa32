"""The one dtype table: the names the config uses for model weights and for stored logits, and what each is
in torch and numpy, with its rounding.

The name tuples are plain strings, so the config schema reads them without importing torch; the tables of
torch and numpy dtypes are built on first use (module `__getattr__`), by the modules that compute with them.
"""

from __future__ import annotations

MODEL_DTYPE_NAMES = ("float32", "bfloat16", "float16")  # teacher.dtype, student.dtype: torch's own names
LOGIT_DTYPE_NAMES = ("fp16", "bf16", "fp32")  # cache.logit_dtype: what stored logits are rounded to
# half the spacing of floats at 1 (the largest relative rounding error), per stored format
HALF_ULP = {"fp32": 2.0**-24, "fp16": 2.0**-11, "bf16": 2.0**-8}


def _tables() -> dict:
    import numpy as np
    import torch

    logit = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    return {
        # teacher.dtype / student.dtype -> the torch dtype weights load in
        "TORCH_DTYPES": {name: getattr(torch, name) for name in MODEL_DTYPE_NAMES},
        # cache.logit_dtype -> the torch dtype logits are rounded to
        "LOGIT_DTYPES": logit,
        # ... and the numpy dtype they are stored as (bf16 as its bit patterns, uint16: numpy has no bfloat16)
        "STORED_LOGIT_DTYPES": {"fp16": np.dtype(np.float16), "bf16": np.dtype(np.uint16), "fp32": np.dtype(np.float32)},
        # torch dtype -> the stored-format name of the same precision
        "DTYPE_NAMES": {dtype: name for name, dtype in logit.items()},
    }


_TABLE_NAMES = ("TORCH_DTYPES", "LOGIT_DTYPES", "STORED_LOGIT_DTYPES", "DTYPE_NAMES")


def __getattr__(name: str):
    if name not in _TABLE_NAMES:  # the import system asks for others (__path__, ...): they do not exist
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals().update(_tables())  # once: later lookups find the tables in the module's namespace
    return globals()[name]
