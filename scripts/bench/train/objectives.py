"""The loss objectives' step cost, all from the same cache, one child per variant: the demo loss (kl, gamma
0.2 cosine) with and without FDD (delta 0.2; goal <= 1.05x), and each divergence in place of kl
(`loss.logits`), side by side with the plain kl step. The step-time ratios are the point; the variants run in
the order listed, three rounds (ABC ABC ABC), and each variant's step time is the fastest round's median
(anything else on the machine only ever adds time). Then the FDD term and the cosine hidden loss timed alone
on one step's tensors (the step-time ratio between runs carries the machine's noise; this is the term's own
cost).

    python -m scripts.bench.train.objectives [--steps 6] [--warmup 2] [--out FILE.jsonl]

Sizes, --bf16, --student-vocab and --out as in the other training benchmarks (common.py).
"""

from __future__ import annotations

import statistics
import time

from scripts.bench.train import common

# (name, loss overrides) over the demo loss; the first is the reference of the ratios
OBJECTIVES = [
    ("kl (demo loss)", []),
    ("kl + fdd (delta 0.2)", ["loss.delta=0.2", "loss.dynamics=fdd"]),
    ("reverse_kl", ["loss.logits=reverse_kl"]),
    ("skew_kl (lambda 0.1)", ["loss.logits=skew_kl"]),
    ("skew_reverse_kl (lambda 0.1)", ["loss.logits=skew_reverse_kl"]),
    ("jsd", ["loss.logits=jsd"]),
    ("gjsd (beta 0.5)", ["loss.logits=gjsd"]),
]


def median_seconds(fn, repeats: int = 20) -> float:
    """Median wall time of fn().backward()."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def term_cost(args, work) -> tuple[float, float, int, int]:
    """Seconds for the FDD term and for the cosine hidden loss alone (forward + backward) on tensors of one
    step's shape: the mapped student blocks' projected outputs and the teacher's layers, every token valid."""
    import torch

    from pipeline.config import load_config
    from pipeline.losses.dynamics import dynamics_loss
    from pipeline.losses.hidden import hidden_loss
    from pipeline.sources.models import load_config as model_config

    cfg = load_config(common.DEMO, common.overrides(args, work, args.teacher_path))
    layer_map = common.layer_map_of(args, work, cfg)
    n, d = args.batch_size * args.seq_len, model_config(args.teacher_path).hidden_size
    g = torch.Generator().manual_seed(0)
    students = [torch.randn(n, d, generator=g, requires_grad=True) for _ in layer_map]
    teachers = [torch.randn(n, d, generator=g) for _ in layer_map]
    mask = torch.ones(n, dtype=torch.bool)
    fdd = median_seconds(lambda: dynamics_loss("fdd", students, teachers, mask))
    cosine = median_seconds(
        lambda: torch.stack([hidden_loss("cosine", s_, t_, mask) for s_, t_ in zip(students, teachers)]).mean())
    return fdd, cosine, len(layer_map), d


def run(args, runner: common.Runner) -> None:
    step = common.run_rounds(runner, OBJECTIVES, "objective")
    fdd_s, cosine_s, n_mapped, d_teacher = term_cost(args, runner.work)
    ref = OBJECTIVES[0][0]
    runner.results.add({"case": "fdd term alone", "seconds": fdd_s, "headline": {"s": fdd_s}})
    if ref in step:
        print(f"\nthe terms alone (forward + backward on this step's tensors: {args.batch_size * args.seq_len} tokens, "
              f"{n_mapped} mapped layers, d_teacher {d_teacher}; median of 20):\n"
              f"  fdd    {fdd_s * 1e3:.1f} ms = {fdd_s / step[ref]:.4f} of the {ref} step -> "
              f"fdd step / plain step = {1 + fdd_s / step[ref]:.3f} (goal <= 1.05)\n"
              f"  cosine hidden loss {cosine_s * 1e3:.1f} ms = {cosine_s / step[ref]:.4f} of the step")


def main(argv: list[str] | None = None) -> None:
    common.main(argv, "objectives", __doc__)


if __name__ == "__main__":
    main()
