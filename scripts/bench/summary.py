"""One table of a suite run: every result row the benchmarks appended to their JSON-lines file(s), in order.

    python -m scripts.bench.summary runs/bench/results.jsonl [MORE.jsonl ...]

A row shows its benchmark, what it measured (`case`) and its headline numbers, or why it failed; rows
without a case (a run's header line) are left out. A file that does not exist is named and skipped, so a
suite stopped early still gets its table.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from scripts.harness import number, read_rows, table_header, table_row


def rows_of(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        if not path.is_file():
            print(f"({path}: no results)")
            continue
        rows += read_rows(path)
    return [r for r in rows if r.get("case")]


def why(error: str) -> str:
    """The line of an error's text that says what failed: the last exception line of a traceback (progress bars
    may follow it), else the last line."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()] or ["?"]
    named = [line for line in lines if re.match(r"[\w.]*(Error|Exception|Interrupt)\b|error:", line)]
    return (named or lines)[-1][:120].replace("|", "/")


def measured(row: dict) -> str:
    if row.get("error"):
        return "failed: " + why(row["error"])
    return "; ".join(f"{label} {number(value)}" for label, value in (row.get("headline") or {}).items())


def table(rows: list[dict]) -> str:
    lines = [table_header("benchmark", "case", "measured")]
    lines += [table_row(r.get("bench", "?"), str(r["case"]).replace("|", "/"), measured(r)) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path, help="JSON-lines files the benchmarks wrote with --out")
    args = ap.parse_args(argv)
    rows = rows_of(args.files)
    print(f"\n## The suite: {len(rows)} results\n")
    print(table(rows))


if __name__ == "__main__":
    main()
