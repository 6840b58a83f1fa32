"""Benchmark-evaluation throughput: items/s per lm-eval task for the packaged SmolLM2-135M-Instruct teacher.

Each task runs as its own `run_benchmarks` call (0-shot, lm-eval's first --limit items of the packaged
split), so `seconds` is everything a user waits for per task: writing the task YAML, loading the
packaged data (hellaswag also maps lm-eval's process_docs over all 10,042 rows), building the requests
and the model's forward passes. At small limits that fixed set-up is a visible share of the time.

    python scripts/bench_eval.py [--tasks arc_easy,piqa] [--limit 20] [--batch-size 8]

Prints a markdown table: task | items | seconds | items/s | acc (acc_norm where the task reports it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# never reach for a hub: everything this script reads ships in installed packages
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DISTILL_MODELS_DIR", str(ROOT / "cache" / "models"))


def main() -> None:
    from pipeline.evaluate.benchmarks import DEFAULT_TASKS, check_limit, check_tasks, run_benchmarks
    from pipeline.sources.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated lm-eval task names")
    parser.add_argument("--limit", type=int, default=20, help="first N items of each task (lm-eval --limit)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    tasks = check_tasks([t.strip() for t in args.tasks.split(",") if t.strip()])
    check_limit(args.limit)

    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m-instruct")  # first call converts the packaged GGUF (~35 s)
    print(f"teacher loaded in {time.perf_counter() - start:.1f} s; torch threads: "
          f"{__import__('torch').get_num_threads()}", file=sys.stderr)

    rows = []
    for task in tasks:
        start = time.perf_counter()
        result = run_benchmarks(model, tokenizer, [task], limit=args.limit, batch_size=args.batch_size,
                                progress=False)["tasks"][task]
        seconds = time.perf_counter() - start
        acc = f"{result['acc']:.3f}"
        if "acc_norm" in result:
            acc += f" (norm {result['acc_norm']:.3f})"
        rows.append((task, result["n"], seconds, acc))

    print(f"\nlimit {args.limit}, batch size {args.batch_size}, 0-shot, fp32 on {model.device}\n")
    print("| task | items | seconds | items/s | acc |")
    print("|---|---:|---:|---:|---|")
    for task, n, seconds, acc in rows:
        print(f"| {task} | {n} | {seconds:.1f} | {n / seconds:.2f} | {acc} |")
    total_n, total_s = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"| **all** | {total_n} | {total_s:.1f} | {total_n / total_s:.2f} | |")


if __name__ == "__main__":
    from pipeline.errors import PipelineError

    try:
        main()
    except PipelineError as e:
        sys.exit(f"error: {e}")
