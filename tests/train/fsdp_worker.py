"""Several `distill train` runs in one torchrun launch (the launch and the process group are set up once):
`python -m torch.distributed.run --nproc_per_node 2 tests/train/fsdp_worker.py PLAN.json`, where PLAN.json is a
list of {"overrides": [...], "online": bool}, each run as run_train(load_config(None, overrides), online=...)."""

from __future__ import annotations

import json
import sys

from pipeline.config import load_config
from pipeline.recipes.train import run_train


def main(plan_path: str) -> None:
    with open(plan_path, encoding="utf-8") as f:
        plan = json.load(f)
    for run in plan:
        run_train(load_config(None, run["overrides"]), online=run.get("online", False), echo=lambda msg: None)


if __name__ == "__main__":
    main(sys.argv[1])
