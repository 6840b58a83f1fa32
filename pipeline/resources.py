"""What a process has used: peak resident memory (and peak CUDA memory when a GPU is in use); and the disk
space a folder has left, with the test that tells a full disk from other write errors."""

from __future__ import annotations

import errno
import os
import resource
import shutil
from pathlib import Path

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# what writers that drop the errno still say: safetensors ("... (os error 28)"), C++ streams through Python
_NO_SPACE_WORDS = tuple(os.strerror(n) for n in NO_SPACE_ERRNOS) + ("os error 28",)
# free bytes under which a failed write counts as a full disk (a filled disk reports a few pages at most)
FULL_BELOW = 2**20


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


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes an unprivileged writer may still use on the filesystem that holds `path` (or would hold it: the
    nearest existing folder above it counts); None where the system cannot tell."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def no_space_left(exc: BaseException, folder: str | os.PathLike | None = None) -> bool:
    """Whether `exc`, or an exception it was raised from, means that the disk is full: an OSError with ENOSPC or
    EDQUOT, or one of their messages. torch.save loses both (a C++ stream's "unexpected pos"), so with `folder`
    any error counts once the filesystem under it has less than FULL_BELOW bytes free."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS:
            return True
        if any(word in str(e) for word in _NO_SPACE_WORDS):
            return True
        e = e.__cause__ or e.__context__
    if folder is None:
        return False
    free = free_bytes(folder)
    return free is not None and free < FULL_BELOW


def size_text(n: float) -> str:
    """A byte count for people: 812 B, 3.4 KiB, 1.2 MiB, 4.8 GiB, 10.8 TiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError
