"""How far does a sharded run (FSDP2, 2 processes) land from one process with the same global batch, over many
steps? Against DDP (2 processes), which reduces each gradient the same way (two half-batch partial sums, added
by the collective, halved), as the yardstick.

Three runs of the real `distill train` path from one cache, each --steps AdamW steps, global batch 4: one
process x batch 4, `torchrun --nproc_per_node 2` DDP x batch 2, and the same with training.fsdp=full_shard. The
teacher is a random 4-block d = 128 Llama and the student a random 2-block d = 96 one, both with the packaged
SmolLM2 tokenizer (vocabulary 49,152), over the packaged Wikipedia text; the loss is CE + KL + hidden (one
projector per mapped block).

Per step: the largest relative difference of the logged loss from the one-process run, for DDP and FSDP. At
the end: the largest |weight difference| over the student and the projectors, against how far the steps moved
the weights. The bound stated in docs/training.md is DDP's own distance (the same reassociation); AdamW's
per-element normalisation allows no closed-form bound.

    python -m scripts.studies.sharded_equality [--steps 10] [--out FILE.jsonl]
    python -m scripts.studies.sharded_equality --smoke   # 2 steps
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

RUNS = {"one": (1, 4, []), "ddp": (2, 2, []), "fsdp": (2, 2, ["training.fsdp=\"full_shard\""])}


def build(root: Path) -> None:
    """The teacher, the student and the cache under `root`, and root/config.yaml naming them."""
    import yaml

    from pipeline.config import load_config
    from pipeline.recipes.cache import build_cache

    teacher = harness.save_model(harness.random_model(harness.smollm2_config(
        hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32), seed=0, head_scale=20.0), root / "teacher")
    student = harness.save_model(harness.random_model(harness.smollm2_config(
        hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=24), seed=1), root / "student")
    overrides = [f"teacher.model={teacher}", f"student.model={student}", f"cache.dir={root / 'cache'}",
                 "data.seq_len=64", "data.num_sequences=48", "data.heldout_fraction=0.1", "cache.topk=16",
                 "cache.hidden_codec=fp32", "cache.layers=auto", "mapping.strategy=uniform", "loss.gamma=1.0"]
    cfg = load_config(None, overrides)
    build_cache(cfg)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def train(root: Path, name: str, steps: int) -> Path:
    processes, batch, extra = RUNS[name]
    out = root / name
    training = {"output_dir": str(out), "per_device_train_batch_size": batch, "optim": "adamw_torch",
                "learning_rate": 3e-3, "max_steps": steps, "logging_steps": 1, "save_strategy": "no", "seed": 3,
                "use_cpu": True}
    launch = (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
              if processes > 1 else [])
    cmd = [sys.executable, *launch, "-m", "pipeline.cli", "train", str(root / "config.yaml")]
    for item in extra + [f"training.{k}={json.dumps(v)}" for k, v in training.items()]:
        cmd += ["--set", item]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return out


def weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return {**load_file(str(out / "student" / "model.safetensors")),
            **{f"projector.{k}": v for k, v in load_file(str(out / "projectors.safetensors")).items()}}


def losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def compare(root: Path, student: str, steps: int, results: Results) -> None:
    from safetensors.torch import load_file

    start = load_file(str(Path(student) / "model.safetensors"))
    one_w, one_l = weights(root / "one"), losses(root / "one")
    moved = max((one_w[k] - start[k]).abs().max().item() for k in start)
    print(harness.table_header("run", ">largest loss rel. diff", ">largest weight diff", ">moved", ">diff / moved"))
    for name in ("ddp", "fsdp"):
        w, l = weights(root / name), losses(root / name)
        rel = max(abs(a - b) / abs(a) for a, b in zip(one_l, l))
        worst = max((one_w[k] - w[k]).abs().max().item() for k in one_w)
        results.add({"case": f"{name} vs one process, {steps} steps", "steps": steps, "loss_rel_diff": rel,
                     "weight_diff": worst, "moved": moved,
                     "headline": {"loss rel": rel, "weights / moved": worst / moved}})
        print(harness.table_row(name, f"{rel:.2e}", f"{worst:.2e}", f"{moved:.2e}", f"{worst / moved:.2e}"), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=None, help="append one JSON line per result")
    ap.add_argument("--smoke", action="store_true", help="2 steps: the script end to end")
    args = ap.parse_args(argv)
    steps = 2 if args.smoke else args.steps
    results = Results("sharded_equality", args.out)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root)
        for name in RUNS:
            train(root, name, steps)
            print(f"{name}: {steps} steps", flush=True)
        compare(root, str(root / "student"), steps, results)


if __name__ == "__main__":
    main()
