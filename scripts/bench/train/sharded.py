"""Phase two sharded: what one process holds, and how long a step takes, under FSDP2 at 2 processes against one
process and against DDP at 2 processes.

The student is a random SmolLM2-shaped Llama large enough for its training state to dominate (default: d = 768,
14 blocks, MLP 2048, 12 heads / 4 KV heads, untied vocabulary 49,152: 163M parameters, fp32), distilled from a
small random teacher (d = 256, 4 blocks) through its cache (top-16 logits, 2 mapped layers, so 2 projectors),
over the packaged Wikipedia text. Three runs of the real `distill train` path, the same global batch and steps
(AdamW): one process x batch 2, `torchrun --nproc_per_node 2` DDP x batch 1, and the same with
training.fsdp=full_shard.

Per run, from its run.json (rank 0): `resources.held_bytes`, the bytes of the student's and the projectors'
parameters, their gradients and AdamW's two moments this process held at their largest (after an optimizer
step, local shards only; the gathered units, like activations, come and go and are not counted there), the
process's peak RSS, and the mean time of a step (train_seconds / steps). Printed: each against one process, and
the FSDP step time against DDP's. The issue's target: FSDP at 2 processes holds <= 0.55x of one process.

    python -m scripts.bench.train.sharded [--steps 3] [--seq-len 64] [--out FILE.jsonl]
    python -m scripts.bench.train.sharded --smoke     # a d = 64 student: the script end to end in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from scripts import harness  # first: its environment comes before transformers

from scripts.harness import Results

STUDENT = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=14, num_attention_heads=12,
               num_key_value_heads=4, head_dim=64, tie_word_embeddings=False)
SMOKE_STUDENT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
TEACHER = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=64)
RUNS = {"one process": (1, 2, []), "DDP, 2 processes": (2, 1, []),
        "FSDP2, 2 processes": (2, 1, ["training.fsdp=\"full_shard\""])}


def build(root: Path, student_shape: dict, seq_len: int) -> int:
    """Teacher, student and cache under `root`, root/config.yaml naming them; returns the student's parameters."""
    import yaml

    from pipeline.config import load_config
    from pipeline.recipes.cache import build_cache

    teacher = harness.save_model(harness.random_model(harness.smollm2_config(**TEACHER), seed=0, head_scale=20.0),
                                 root / "teacher")
    model = harness.random_model(harness.smollm2_config(**student_shape), seed=1)
    student = harness.save_model(model, root / "student")
    overrides = [f"teacher.model={teacher}", f"student.model={student}", f"cache.dir={root / 'cache'}",
                 f"data.seq_len={seq_len}", "data.num_sequences=24", "data.heldout_fraction=0.0", "cache.topk=16",
                 "cache.layers=auto", "mapping.strategy=uniform",
                 f"mapping.stride={student_shape['num_hidden_layers'] // 2}"]
    cfg = load_config(None, overrides)
    build_cache(cfg)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return sum(p.numel() for p in model.parameters())


def train(root: Path, name: str, steps: int) -> dict:
    """One run of `distill train`; its run.json."""
    processes, batch, extra = RUNS[name]
    out = root / name.split(",")[0].replace(" ", "_")
    training = {"output_dir": str(out), "per_device_train_batch_size": batch, "optim": "adamw_torch",
                "learning_rate": 1e-4, "max_steps": steps, "logging_steps": 1, "save_strategy": "no", "seed": 3,
                "use_cpu": True}
    launch = (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
              if processes > 1 else [])
    cmd = [sys.executable, *launch, "-m", "pipeline.cli", "train", str(root / "config.yaml")]
    for item in extra + [f"training.{k}={json.dumps(v)}" for k, v in training.items()]:
        cmd += ["--set", item]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // processes)))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{name}: distill train failed:\n{r.stderr[-3000:]}")
    return json.loads((out / "run.json").read_text())


def measure(summary: dict) -> dict:
    held = summary["resources"]["held_bytes"]
    metrics = summary["metrics"]
    return {"held": held, "peak_rss_mib": summary["resources"]["peak_rss_mib"],
            "step_s": metrics["train_seconds"] / metrics["steps_this_run"],
            "local_fraction": (summary.get("fsdp") or {}).get("student_local_fraction", 1.0)}


def report(runs: dict, parameters: int, results: Results) -> None:
    base = runs["one process"]
    ddp = runs["DDP, 2 processes"]
    mib = 2 ** 20
    print(harness.table_header("run", ">params MiB", ">grads MiB", ">AdamW MiB", ">held MiB", ">held / one",
                               ">peak RSS MiB", ">RSS / one", ">step s", ">step / one", ">step / DDP"))
    for name, m in runs.items():
        held, ratio = m["held"], m["held"]["total"] / base["held"]["total"]
        row = {"case": f"{name}, {parameters / 1e6:.0f}M student", "run": name, "parameters": parameters,
               "held_bytes": held, "held_total_ratio": ratio,
               "held_part_ratios": {k: held[k] / base["held"][k] for k in ("parameters", "gradients", "optimizer")},
               "peak_rss_mib": m["peak_rss_mib"], "rss_ratio": m["peak_rss_mib"] / base["peak_rss_mib"],
               "step_s": m["step_s"], "step_ratio": m["step_s"] / base["step_s"],
               "step_vs_ddp": m["step_s"] / ddp["step_s"], "student_local_fraction": m["local_fraction"],
               "headline": {"held / one": ratio, "step / DDP": m["step_s"] / ddp["step_s"]}}
        results.add(row)
        print(harness.table_row(name, f"{held['parameters'] / mib:.0f}", f"{held['gradients'] / mib:.0f}",
                                f"{held['optimizer'] / mib:.0f}", f"{held['total'] / mib:.0f}", f"{ratio:.3f}",
                                f"{m['peak_rss_mib']:.0f}", f"{row['rss_ratio']:.2f}", f"{m['step_s']:.2f}",
                                f"{row['step_ratio']:.2f}", f"{row['step_vs_ddp']:.2f}"), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per run (default 3)")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    ap.add_argument("--out", default=None, help="append one JSON line per result")
    ap.add_argument("--smoke", action="store_true", help="a d = 64 student: the script end to end")
    args = ap.parse_args(argv)
    results = Results("sharded_student", args.out)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        parameters = build(root, SMOKE_STUDENT if args.smoke else STUDENT, args.seq_len)
        print(f"student: {parameters / 1e6:.1f}M parameters", flush=True)
        runs = {}
        for name in RUNS:
            runs[name] = measure(train(root, name, args.steps))
            print(f"{name}: done", flush=True)
        report(runs, parameters, results)


if __name__ == "__main__":
    main()
