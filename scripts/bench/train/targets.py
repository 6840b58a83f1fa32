"""Logits KD (alpha .4, beta .4, gamma 0, kl at T = 2) on each kind of teacher target (pipeline/targets.py),
from one cache that holds all three (cache.logits=topk+sampled+exact): the top-64 logits with the exact tail
bucket, exact full-distribution targets (the teacher's head applied to its cached last layer, the dense
divergence over the whole vocabulary), and K = 64 sampled draws. Three rounds as the objectives benchmark, the
step time and peak memory against the top-k step, and each kind's bytes per token in that cache.

    python -m scripts.bench.train.targets [--bf16] [--steps 6] [--out FILE.jsonl]

Sizes, --student-vocab and --out as in the other training benchmarks (common.py).
"""

from __future__ import annotations

from pathlib import Path

from pipeline import targets
from scripts.bench.train import common

SAMPLES = 64  # K, the draws per position; k is the demo config's cache.topk (64)
COUNTS = {"topk": 64, "sampled": SAMPLES}
TARGET_CACHE = ["cache.logits=topk+sampled+exact", f"cache.samples={SAMPLES}"]
CACHE_OVERRIDES = TARGET_CACHE  # what common.setup builds this run's cache with
# the kinds in table order, the first the reference of the ratios
KINDS = [targets.kind(name) for name in ("topk", "exact", "sampled")]
# (name, overrides) of logits KD reading each kind from the cache that holds all three
TARGETS = [(k.label_for(COUNTS.get(k.name)), [*TARGET_CACHE, "loss.gamma=0.0", f"loss.logits_source={k.name}"])
           for k in KINDS]


def target_bytes(cache_dir: Path) -> dict[str, str]:
    """Bytes per token of each kind of target in the cache, by TARGETS name (the exact targets' input is
    layer n among the hidden layers; the head is stored once per cache)."""
    from pipeline.cache.info import cache_facts, target_kind_bytes

    info = cache_facts(str(cache_dir))
    return {name: f"{target_kind_bytes(info, k.name):.0f}" for (name, _), k in zip(TARGETS, KINDS)}


def run(args, runner: common.Runner) -> None:
    common.run_rounds(runner, TARGETS, "targets (logits KD, gamma 0)",
                      ("bytes/token", target_bytes(runner.work / "cache")))


def main(argv: list[str] | None = None) -> None:
    common.main(argv, "targets", __doc__)


if __name__ == "__main__":
    main()
