"""Distillation next to a plain fine-tune of the same student: one child per configuration, one at a time,
the same student, batches (batch size x seq len), dtype, number of steps and optimizer settings (the same
TrainingArguments):
     finetune    - the stock `transformers.Trainer`, labels = input_ids (the cache's train sequences,
                   held in memory), the model's own CE; no distillation. The reference of every ratio.
     kd-dense    - `run_train` from the cache, demo loss (alpha .4, beta .4, gamma .2), loss.chunk_tokens=0
                   (the full [tokens, vocab] logits)
     kd-chunked  - the same with the chunked vocabulary loss (the default chunk, or --chunk-tokens N)
     ce-only     - `run_train`, alpha 1, beta 0, gamma 0 (chunked): CE only, nothing read but input_ids
     online      - `run_train --online` (live teacher, demo loss, chunked), for the memory column
     loader      - the cache DataLoader alone, built with the DataLoader settings of the training runs
                   (dataloader_num_workers, _pin_memory, _prefetch_factor, ... of the TrainingArguments
                   pipeline.train.arguments.training_arguments resolves, CUDA defaults included), a fresh
                   reader each epoch, batches left on the host, in tokens/s against what kd-chunked consumed
                   (tokens per step / step s; goal >= 3x); then, in the same process without workers, the
                   decode cost per token position of each part of a cached item: the top-k ids + logits, the
                   lse planes, each mapped hidden layer (a reader pass that decodes the part minus one that
                   decodes input_ids only), in wall and CPU microseconds and tokens/s per core
It prints median step time and peak memory with both ratios against finetune (goals: KD step <= 1.05x, KD
memory <= 1.05x, CE-only memory < 1.00x), then where the time of a step goes, as mean seconds per optimizer
step over the timed steps: batch read, student forward, head + vocab losses, hidden + projectors, backward,
optimizer, rest, from torch.profiler's labelled ranges over the timed steps (phases.py says which label marks
which phase; the same in every child). Peak memory is the child's own VmHWM on CPU (imports and the loaded
model included; the table notes the RSS after imports) or torch.cuda.max_memory_allocated on CUDA.

    python -m scripts.bench.train.finetune [--sequences 24 --steps 3 --warmup 1] [--chunk-tokens 512]

`--quick` is the one-shot GPU size: seq len 1024, batch 8, 3 timed steps after 2 warm-up, 48 sequences
(batch x (warm-up + steps + 1): one epoch covers every step), the loader timed for >= 3 s; sized for the
whole run (models, cache build, the six children) to end within 4 minutes on one H100. An explicit --seq-len,
--batch-size, --steps, --warmup, --sequences or --loader-seconds overrides its value (with small ones it runs
on a CPU too).

    python -m scripts.bench.train.finetune --quick [--student-vocab 262144] [--bf16] --out run.jsonl

`--student-vocab N` (e.g. 262144, a Gemma-3-sized vocabulary) swaps both models for random-init ones of
SmolLM2-135M width with an N-token vocabulary: an 8-block teacher and a 4-block student (mapping uniform),
the packaged SmolLM2 tokenizer (its ids are < 49,152, so they fit), the cache built from that teacher.
The vocabulary head then dominates the step; seq len and batch size default to 128 and 2 in this mode
(the same for every child; --quick's sizes win). It works with every training benchmark.

`--bf16` trains every child, the stock fine-tune included, with bf16 mixed precision (training.bf16=true:
torch autocast, on the CPU too); the cache and the teacher stay as they are. `--out FILE.jsonl` appends a
header line and one JSON line per finished child, each written when it happens.
"""

from __future__ import annotations

from scripts.bench.train import common
from scripts.bench.train.common import mem_key, ok
from scripts.bench.train.phases import PHASE_NAMES, PHASES

GOALS = {"kd-dense": (1.05, 1.05, "<="), "kd-chunked": (1.05, 1.05, "<="), "ce-only": (None, 1.00, "<")}
PHASE_TABLE_HEADER = ("| run | " + " | ".join(PHASE_NAMES[p] for p in PHASES) + " | step (mean) |\n"
                      + "|---|" + "---:|" * (len(PHASES) + 1))


def runs(chunk: int | None) -> list[tuple[str, str, list[str], str]]:
    """(name, child, loss overrides, description); the first is the reference of the ratios."""
    ch = [f"loss.chunk_tokens={chunk}"] if chunk else []
    c = f"chunk {chunk or _default_chunk()}"
    return [
        ("finetune", "finetune", [], "stock Trainer, CE on input_ids"),
        ("kd-dense", "cache", ["loss.chunk_tokens=0"], "demo loss, dense logits"),
        ("kd-chunked", "cache", ch, f"demo loss, {c}"),
        ("ce-only", "cache", ["loss.alpha=1", "loss.beta=0", "loss.gamma=0", *ch], f"alpha 1 beta 0 gamma 0, {c}"),
        ("online", "online", ch, f"live teacher, demo loss, {c}"),
    ]


def goal_text(ratio: float, limit: float | None, op: str) -> str:
    if limit is None:
        return ""
    met = ratio <= limit if op == "<=" else ratio < limit
    return f"{op} {limit:.2f}x: {'met' if met else 'missed'}"


def step_table_header(mem: str) -> str:
    return (f"| run | step s (median) | step vs finetune | goal | {mem.replace('_', ' ')} | memory vs finetune | goal |\n"
            "|---|---:|---:|---|---:|---:|---|")


def step_row(name: str, what: str, r: dict, ref: dict | None) -> str:
    if not ok(r):
        return f"| {name} ({what}) | failed | | | | | |"
    mem = mem_key(r)
    if name == "finetune":
        return f"| {name} ({what}) | {r['step_s']:.3f} | 1.000 | reference | {r[mem]:.0f} | 1.000 | reference |"
    if not ok(ref) or mem not in ref:
        return f"| {name} ({what}) | {r['step_s']:.3f} | n/a | | {r[mem]:.0f} | n/a | |"
    step, peak = r["step_s"] / ref["step_s"], r[mem] / ref[mem]
    gs, gm, op = GOALS.get(name, (None, None, ""))
    return (f"| {name} ({what}) | {r['step_s']:.3f} | {step:.3f} | {goal_text(step, gs, '<=')} | {r[mem]:.0f} | "
            f"{peak:.3f} | {goal_text(peak, gm, op)} |")


def phase_row(name: str, r: dict) -> str:
    if not ok(r):
        return f"| {name} | failed |" + " |" * len(PHASES)
    b = r["breakdown"]
    total = sum(b.values())
    return (f"| {name} | " + " | ".join(f"{b[p]:.3f} ({100 * b[p] / total:.0f}%)" for p in PHASES)
            + f" | {total:.3f} |")


def print_summary(plan, vs: dict[str, dict]) -> bool:
    """The step table of every child against the fine-tune, the phase table, the step times; False when every
    training child failed."""
    print("\nsummary")
    done = [r for r in vs.values() if ok(r)]
    if not done:
        print("every training child failed")
        return False
    ref = vs["finetune"]
    print(step_table_header(mem_key(done[0])))
    for name, _, _, what in plan:
        print(step_row(name, what, vs[name], ref))
    if ok(ref) and mem_key(ref) == "peak_rss_mib":
        print(f"(peak RSS includes the child's imports: {ref['rss_after_imports_mib']:.0f} MiB right after them)")
    print("\nper optimizer step, mean s over the timed steps (share of the step):")
    print(PHASE_TABLE_HEADER)
    for name, _, _, _ in plan:
        print(phase_row(name, vs[name]))
    print("steps (s): " + "; ".join(f"{name}: " + " ".join(f"{s:.2f}" for s in vs[name]["steps"])
                                     for name, _, _, _ in plan if ok(vs[name])))
    return True


def run(args, runner) -> None:
    plan = runs(args.chunk_tokens)
    vs: dict[str, dict] = {}
    for name, child, loss, what in plan:
        vs[name] = r = runner.child(name, child, loss, breakdown=True)
        if ok(r):
            print(f"\n{name} ({what}): {r['child_s']:.0f} s child; autocast {r['autocast']}; steps (s) "
                  + " ".join(f"{s:.3f}" for s in r["steps"]))
            print(f"{step_table_header(mem_key(r))}\n{step_row(name, what, r, vs.get('finetune'))}\n"
                  f"{PHASE_TABLE_HEADER}\n{phase_row(name, r)}")
    tok_step = args.batch_size * args.seq_len
    ld = runner.child("loader", "loader")
    if ok(ld):
        print(f"\nloader: {ld['child_s']:.0f} s child")
        common.print_loader(ld, "kd-chunked", vs.get("kd-chunked"), tok_step)
    if print_summary(plan, vs) and ok(ld):
        print()
        common.print_loader(ld, "kd-chunked", vs.get("kd-chunked"), tok_step)


def _default_chunk() -> int:
    from pipeline.config import load_config

    return load_config(common.DEMO).loss.chunk_tokens


def main(argv: list[str] | None = None) -> None:
    common.main(argv, "vs-finetune", __doc__)


if __name__ == "__main__":
    main()
