"""scripts/bench/head_loss.py end to end at a tiny size on the CPU: a row per run, fp32 and bf16."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUNS = ("stock", "ce", "kd T=1", "kd T=2", "kd dense")


@pytest.mark.parametrize("bf16", [False, True])
def test_tiny_run_prints_every_row(bf16):
    cmd = [sys.executable, "-m", "scripts.bench.head_loss", "--tokens", "96", "--hidden", "32",
           "--vocab", "700", "--chunk", "40", "--repeats", "1", "--device", "cpu", *(["--bf16"] if bf16 else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120, cwd=REPO).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    assert [r.split(" | ")[0][2:] for r in rows] == list(RUNS)
    for r in rows:
        seconds, ratio = (float(x) for x in r.split(" | ")[1:3])
        assert seconds > 0 and ratio > 0
    assert rows[0].split(" | ")[2] == "1.00"
