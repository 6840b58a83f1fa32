"""An ablation of N variants over one cache vs N separate cache + train runs, measured side by side in one run.

    python -m scripts.bench.ablate [--variants 3] [--sequences 48] [--seq-len 128] [--steps 5] [--out FILE.jsonl]

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

from scripts import harness
from scripts.harness import Results, table_header, table_row

MAPS = ["uniform", "last", "selected"]


def distill(*args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.cli", *args], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def ablation_config(root: Path, student: Path, a) -> tuple[Path, dict]:
    """The ablation's YAML (written under `root`) and its variants: the layer maps in turn, gamma growing per
    round of them."""
    variants = {f"v{i}_{MAPS[i % len(MAPS)]}": {"mapping.strategy": MAPS[i % len(MAPS)],
                                                 "loss.gamma": 0.1 + 0.1 * (i // len(MAPS))}
                for i in range(a.variants)}
    base = {
        "teacher": {"model": harness.PACKAGED_TEACHER},
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
    return config, variants


def separate_runs(root: Path, config: Path, student: Path, variants: dict) -> float:
    """Seconds of a cache build + train + eval per variant, and the two baseline evals."""
    seconds = 0.0
    for name, overrides in variants.items():
        sets = [f"{k}={v}" for k, v in overrides.items()]
        sets += [f"cache.dir={root / ('cache-' + name)}", f"training.output_dir={root / 'separate' / name}"]
        args = [x for s in sets for x in ("--set", s)]
        seconds += distill("cache", "build", str(config), *args)
        seconds += distill("train", str(config), *args)
        seconds += distill("eval", "--model", str(root / "separate" / name / "student"), "--heldout",
                           str(root / ("cache-" + name)), "--tasks", "none")
    for model in (harness.PACKAGED_TEACHER, str(student)):  # the baselines the ablation scores once
        seconds += distill("eval", "--model", model, "--heldout", str(root / "cache-ablate"), "--tasks", "none")
    return seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", type=int, default=3)
    p.add_argument("--sequences", type=int, default=48)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", metavar="FILE.jsonl", help="append one JSON line per side as it finishes")
    a = p.parse_args(argv)
    results = Results("ablate", a.out)

    root = Path(tempfile.mkdtemp(prefix="bench_ablate_"))
    student = root / "student"
    print(f"pruning the packaged teacher into {student} ...", file=sys.stderr)
    distill("prune", "--model", harness.PACKAGED_TEACHER, "--out", str(student), "--remove", "6",
            "--calibration-sequences", "16", "--heldout-sequences", "0", "--seq-len", str(a.seq_len))
    config, variants = ablation_config(root, student, a)
    n = len(variants)

    print(f"ablate: {n} variants over one cache ...", file=sys.stderr)
    t_ablate = distill("ablate", str(config))
    results.add({"case": f"distill ablate, {n} variants over one cache", "seconds": t_ablate, "teacher_passes": 1,
                 "headline": {"s": t_ablate}})
    print("separate: cache build + train + eval per variant ...", file=sys.stderr)
    t_separate = separate_runs(root, config, student, variants)
    results.add({"case": f"{n} separate cache + train runs", "seconds": t_separate, "teacher_passes": n,
                 "headline": {"s": t_separate, "ablate / separate": t_ablate / t_separate}})

    print(f"\n{n} variants, {a.sequences} x {a.seq_len} tokens, {a.steps} steps each (wall seconds)\n")
    print(table_header("mode", ">teacher passes over the corpus", ">seconds", ">ratio"))
    print(table_row("distill ablate (one cache)", 1, f"{t_ablate:.0f}", f"{t_ablate / t_separate:.2f}"))
    print(table_row("separate cache + train runs", n, f"{t_separate:.0f}", "1.00"))
    print(f"\n(scratch folder {root})")


if __name__ == "__main__":
    main()
