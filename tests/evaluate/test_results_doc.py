"""docs/results.md's tables regenerate from the result files committed next to them.

`scripts/results.py --from-copies` recomputes every table (recovery metrics, paired differences) from the
committed eval JSONs and run records; the regenerated tables.md must equal the committed one, and every
table row of tables.md must appear verbatim in docs/results.md.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "docs" / "results"


@pytest.mark.skipif(not (RESULTS / "tables.md").is_file(), reason="no committed results")
def test_tables_regenerate_from_committed_files(tmp_path):
    out = tmp_path / "results"
    shutil.copytree(RESULTS, out)
    (out / "tables.md").unlink()
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "results.py"), "--from-copies", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    regenerated = (out / "tables.md").read_text()
    assert regenerated == (RESULTS / "tables.md").read_text()
    doc = (REPO / "docs" / "results.md").read_text()
    rows = [line for line in regenerated.splitlines() if line.startswith("| ") and "---" not in line]
    missing = [line for line in rows if line not in doc]
    assert not missing, f"{len(missing)} table rows of tables.md are not in docs/results.md, first: {missing[0]}"
