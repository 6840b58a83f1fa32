"""Tables of the results pages from their result files.

    python -m scripts.docs.results runs/budget --budget --out docs/results     # docs/results.md (`make experiments`)
    python -m scripts.docs.results runs/experiments --out docs/results-toy     # docs/results-toy.md (`make experiments-toy`)

Reads what the runs leave under EXP (the ablations' ablation.json, every model's eval JSON, each variant's
run record; the budget runs' held-out curves and the cache's bytes per target kind; the toy experiment's
online run and report figures), copies the small files next to the tables (no weights, no cache) and writes
OUT/tables.md and OUT/results.json. Reading the copies instead (`--from-copies`) regenerates the same tables
without the runs.

Every number is computed from those files with pipeline.evaluate.metrics: recovery metrics from the teacher,
pruned and recovered eval JSONs, and paired differences (same held-out sequences, same benchmark items) with
their standard errors. budget.py holds the budget page's tables, toy.py the toy page's, tables.py and
plots.py what they share.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scripts.docs.budget import budget_tables, collect_budget
from scripts.docs.toy import collect, toy_tables


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exp", nargs="?", default=None,
                    help="what the runs wrote (default: runs/budget with --budget, else runs/experiments)")
    ap.add_argument("--out", default=None, help="where the copies, tables.md and results.json go "
                    "(default: docs/results with --budget, else docs/results-toy)")
    ap.add_argument("--from-copies", action="store_true", help="read OUT's copies only (no runs needed)")
    ap.add_argument("--budget", action="store_true", help="EXP is `make budget`'s ablation (docs/results.md)")
    a = ap.parse_args(argv)
    exp = Path(a.exp or ("runs/budget" if a.budget else "runs/experiments"))
    out = Path(a.out or ("docs/results" if a.budget else "docs/results-toy"))
    if not a.from_copies:
        (collect_budget if a.budget else collect)(exp, out)
    md, results = (budget_tables if a.budget else toy_tables)(out)
    (out / "tables.md").write_text("\n".join(md) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
