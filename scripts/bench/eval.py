"""Benchmark-evaluation throughput: items/s per lm-eval task for the packaged SmolLM2-135M-Instruct teacher.

Each task runs as its own `run_benchmarks` call (0-shot, lm-eval's first --limit items of the packaged
split), so `seconds` is everything a user waits for per task: writing the task YAML, loading the
packaged data (hellaswag also maps lm-eval's process_docs over all 10,042 rows), building the requests
and the model's forward passes. At small limits that fixed set-up is a visible share of the time.

    python -m scripts.bench.eval [--tasks arc_easy,piqa] [--limit 20] [--batch-size 8] [--out FILE.jsonl]

Prints a markdown table: task | items | seconds | items/s | acc (acc_norm where the task reports it).
"""

from __future__ import annotations

import argparse
import sys
import time

from scripts import harness  # first: its environment comes before transformers
from scripts.harness import Results, table_header, table_row


def run_task(model, tokenizer, task: str, args) -> dict:
    from pipeline.evaluate.benchmarks import run_benchmarks

    start = time.perf_counter()
    result = run_benchmarks(model, tokenizer, [task], limit=args.limit, batch_size=args.batch_size,
                            progress=False)["tasks"][task]
    seconds = time.perf_counter() - start
    acc = f"{result['acc']:.3f}"
    if "acc_norm" in result:
        acc += f" (norm {result['acc_norm']:.3f})"
    return {"case": task, "items": result["n"], "seconds": seconds, "acc": acc,
            "headline": {"items/s": result["n"] / seconds}}


def main(argv: list[str] | None = None) -> None:
    import torch

    from pipeline.evaluate.benchmarks import DEFAULT_TASKS, check_limit, check_tasks
    from pipeline.sources.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated lm-eval task names")
    parser.add_argument("--limit", type=int, default=20, help="first N items of each task (lm-eval --limit)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", metavar="FILE.jsonl", help="append one JSON line per task as it finishes")
    args = parser.parse_args(argv)
    tasks = check_tasks([t.strip() for t in args.tasks.split(",") if t.strip()])
    check_limit(args.limit)
    harness.quiet_transformers()
    results = Results("eval", args.out)

    start = time.perf_counter()
    model, tokenizer = load_model(harness.PACKAGED_TEACHER)  # first call converts the packaged GGUF (~35 s)
    print(f"teacher loaded in {time.perf_counter() - start:.1f} s; torch threads: {torch.get_num_threads()}",
          file=sys.stderr)
    rows = [results.add(run_task(model, tokenizer, task, args)) for task in tasks]

    print(f"\nlimit {args.limit}, batch size {args.batch_size}, 0-shot, fp32 on {model.device}\n")
    print(table_header("task", ">items", ">seconds", ">items/s", "acc"))
    for r in rows:
        print(table_row(r["case"], r["items"], f"{r['seconds']:.1f}", f"{r['items'] / r['seconds']:.2f}", r["acc"]))
    total_n, total_s = sum(r["items"] for r in rows), sum(r["seconds"] for r in rows)
    print(table_row("**all**", total_n, f"{total_s:.1f}", f"{total_n / total_s:.2f}", ""))


if __name__ == "__main__":
    from pipeline.errors import PipelineError

    try:
        main()
    except PipelineError as e:
        sys.exit(f"error: {e}")
