"""What a process has used: peak resident memory (and peak CUDA memory when a GPU is in use)."""

from __future__ import annotations

import resource
from pathlib import Path


def _status_mib(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """This process's own peak resident set. Linux's ru_maxrss carries the parent's RSS across fork+exec (a
    child spawned by a parent holding a 7 GB teacher would report >= 7 GB); VmHWM belongs to the exec'd image."""
    peak = _status_mib("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux; other systems: approximate


def rss_now_mib() -> float:
    now = _status_mib("VmRSS")
    return float("nan") if now is None else now


def peak_memory() -> dict:
    """{"peak_rss_mib"} plus {"cuda_peak_allocated_mib", "cuda_device"} when CUDA is in use."""
    import torch

    out = {"peak_rss_mib": peak_rss_mib()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_device"] = torch.cuda.get_device_name()
    return out
