"""The results pages' tables regenerate from the result files committed next to them.

`python -m scripts.docs.results --from-copies` recomputes every table (recovery metrics, paired differences) from the
committed eval JSONs and run records; the regenerated tables.md must equal the committed one, and every
table row of tables.md must appear verbatim in its page: docs/results.md (the budget runs, `--budget`) and
docs/results-toy.md (the toy-budget experiment).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
PAGES = [("results", "results.md", ["--budget"]), ("results-toy", "results-toy.md", [])]


@pytest.mark.parametrize("folder,page,flags", PAGES, ids=[p[1] for p in PAGES])
def test_tables_regenerate_from_committed_files(tmp_path, folder, page, flags):
    committed = DOCS / folder
    if not (committed / "tables.md").is_file():
        pytest.skip(f"no committed results in docs/{folder}")
    out = tmp_path / folder
    shutil.copytree(committed, out)
    (out / "tables.md").unlink()
    r = subprocess.run([sys.executable, "-m", "scripts.docs.results", "--from-copies", *flags, "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    regenerated = (out / "tables.md").read_text()
    assert regenerated == (committed / "tables.md").read_text()
    doc = (DOCS / page).read_text()
    rows = [line for line in regenerated.splitlines() if line.startswith("| ") and "---" not in line]
    missing = [line for line in rows if line not in doc]
    assert not missing, f"{len(missing)} table rows of tables.md are not in docs/{page}, first: {missing[0]}"
