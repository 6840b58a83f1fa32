"""An ablation of N variants over one cache vs N separate cache + train runs, measured side by side in one run.

    python scripts/bench_ablate.py [--variants 3] [--sequences 48] [--seq-len 128] [--steps 5]

Both sides train and score the same N variants of the packaged SmolLM2 teacher's pruned student (its 6 least
important blocks removed, made once into a temporary folder) with the same data, steps and held-out scoring:

    ablate    `distill ablate`: the cache is built once (the union of the layers all variants map), then per
              variant `distill train` + `distill eval` in their own processes, plus the teacher's and the
              untrained student's scores once
    separate  per variant `distill cache build` (its own cache, the layers its map needs) + `distill train` +
              `distill eval`, plus the same two baseline evals once

Prints seconds per side, the ratio, and how many teacher forward passes over the corpus each side paid.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

MAPS = ["uniform", "last", "selected"]


def distill(*args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.cli", *args], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", type=int, default=3)
    p.add_argument("--sequences", type=int, default=48)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_ablate_"))
    student = root / "student"
    print(f"pruning the packaged teacher into {student} ...", file=sys.stderr)
    distill("prune", "--model", "smollm2-135m-instruct", "--out", str(student), "--remove", "6",
            "--calibration-sequences", "16", "--heldout-sequences", "0", "--seq-len", str(a.seq_len))
    variants = {f"v{i}_{MAPS[i % len(MAPS)]}": {"mapping.strategy": MAPS[i % len(MAPS)],
                                                 "loss.gamma": 0.1 + 0.1 * (i // len(MAPS))}
                for i in range(a.variants)}
    base = {
        "teacher": {"model": "smollm2-135m-instruct"},
        "student": {"model": str(student)},
        "data": {"sources": [{"path": "wiki-vital"}], "seq_len": a.seq_len, "num_sequences": a.sequences,
                 "heldout_fraction": 0.125, "seed": 0},
        "cache": {"dir": str(root / "cache-ablate"), "layers": "auto", "batch_size": 8},
        "mapping": {"strategy": "uniform", "stride": 6},
        "training": {"per_device_train_batch_size": 4, "max_steps": a.steps, "learning_rate": 1e-4,
                     "save_strategy": "no", "logging_steps": 1, "seed": 0},
        "ablate": {"output_dir": str(root / "ablate"), "variants": variants},
    }
    config = root / "ablate.yaml"
    config.write_text(yaml.safe_dump(base, sort_keys=False))

    print(f"ablate: {len(variants)} variants over one cache ...", file=sys.stderr)
    t_ablate = distill("ablate", str(config))

    print("separate: cache build + train + eval per variant ...", file=sys.stderr)
    t_separate = 0.0
    for name, overrides in variants.items():
        sets = [f"{k}={v}" for k, v in overrides.items()]
        sets += [f"cache.dir={root / ('cache-' + name)}", f"training.output_dir={root / 'separate' / name}"]
        args = [x for s in sets for x in ("--set", s)]
        t_separate += distill("cache", "build", str(config), *args)
        t_separate += distill("train", str(config), *args)
        t_separate += distill("eval", "--model", str(root / "separate" / name / "student"), "--heldout",
                              str(root / ("cache-" + name)), "--tasks", "none")
    for model in ("smollm2-135m-instruct", str(student)):  # the baselines the ablation scores once
        t_separate += distill("eval", "--model", model, "--heldout", str(root / "cache-ablate"), "--tasks", "none")

    n = len(variants)
    print(f"\n{n} variants, {a.sequences} x {a.seq_len} tokens, {a.steps} steps each (wall seconds)\n")
    print("| mode | teacher passes over the corpus | seconds | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| distill ablate (one cache) | 1 | {t_ablate:.0f} | {t_ablate / t_separate:.2f} |")
    print(f"| separate cache + train runs | {n} | {t_separate:.0f} | 1.00 |")
    print(f"\n(scratch folder {root})")


if __name__ == "__main__":
    main()
