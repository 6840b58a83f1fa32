"""What the four phase-two benchmarks share: the command line, the models and the cache they train on, the
runner of their child processes, the rounds of --objectives and --targets, and the loader's report.

Sizes: an explicit flag wins, else --quick's (the one-shot GPU size of the fine-tune comparison), else the
defaults (seq len 256 and batch 4; 128 and 2 with --student-vocab, where the vocabulary head dominates).
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

from scripts import harness
from scripts.harness import Results

DEMO = harness.DEMO_CONFIG
# SmolLM2 family shapes (vocab 49,152, tied embeddings) for random-init teachers
TEACHER_SHAPES = {
    "360m": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
             "num_key_value_heads": 5},
    "1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
             "num_key_value_heads": 32},
}
# --student-vocab N: random-init teacher and student of SmolLM2-135M width with this many blocks
RANDOM_TEACHER_BLOCKS, RANDOM_STUDENT_BLOCKS = 8, 4
PACKAGED_VOCAB = 49152  # the packaged SmolLM2 tokenizer's ids are below this
# --quick (the fine-tune comparison): one epoch of 48 sequences covers the 2 + 3 (+ 1 untimed) steps
QUICK = {"seq_len": 1024, "batch_size": 8, "steps": 3, "warmup": 2, "loader_seconds": 3.0}
DEFAULTS = {"steps": 6, "warmup": 2, "sequences": 40, "loader_seconds": 10.0}
# the settings every child gets (the parent resolves them once)
CHILD_ARGS = ("sequences", "seq_len", "batch_size", "steps", "warmup", "stride", "mapping", "loader_seconds")
CHILD_SETTINGS = (*CHILD_ARGS, "bf16", "teacher_path")
# the runs, by their flag: the module that holds each (scripts/bench/train/<module>.py)
MODULES = {"compare": "online", "objectives": "objectives", "targets": "targets", "vs-finetune": "finetune"}


def overrides(args, work: Path, teacher: str) -> list[str]:
    return [
        f"teacher.model={teacher}", f"student.model={work / 'student'}", f"cache.dir={work / 'cache'}",
        f"data.num_sequences={args.sequences}", f"data.seq_len={args.seq_len}", "data.heldout_fraction=0",
        "cache.layers=auto", f"cache.batch_size={args.batch_size}", "cache.shard_sequences=32",
        "cache.chunk_sequences=8", f"mapping.strategy={args.mapping}", f"mapping.stride={args.stride}",
    ]


def training(args, out: Path) -> list[str]:
    """training.* overrides shared by every child. The DataLoader settings are left to the defaults of
    pipeline.train.arguments.training_arguments, so the cache children, the fine-tune and the loader child
    all follow them (and the online child gets what run_train gives an online run)."""
    import json

    import torch

    t = {
        "output_dir": str(out), "per_device_train_batch_size": args.batch_size, "max_steps": args.warmup + args.steps + 1,
        "learning_rate": 1e-4, "logging_steps": 1000, "save_strategy": "no", "eval_strategy": "no", "warmup_steps": 0,
        "seed": 0, "use_cpu": not torch.cuda.is_available(), "bf16": args.bf16,
    }
    return [f"training.{k}={json.dumps(v)}" for k, v in t.items()]


def layer_map_of(args, work: Path, cfg) -> dict[int, int]:
    """The student -> teacher layer map every run_train child builds (student depth and kept blocks from
    its folder, teacher depth from its config)."""
    from pipeline.sources.models import load_config as model_config
    from pipeline.student.layer_map import build_layer_map, read_kept_layers

    n_student = model_config(str(work / "student")).num_hidden_layers
    n_teacher = model_config(args.teacher_path).num_hidden_layers
    return build_layer_map(cfg.mapping.strategy, n_student, n_teacher, cfg.mapping.stride,
                           read_kept_layers(work / "student"))


# ----------------------------------------------------------------------------- the command line


def _parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=None,
                    help=f"cached sequences, default {DEFAULTS['sequences']} (--quick: batch x (warm-up + steps + 1)); "
                         ">= batch x (steps + warm-up + 1) keeps the timed steps in one epoch")
    ap.add_argument("--seq-len", type=int, default=None,
                    help=f"default 256 (128 with --student-vocab; --quick: {QUICK['seq_len']})")
    ap.add_argument("--batch-size", type=int, default=None,
                    help=f"default 4 (2 with --student-vocab; --quick: {QUICK['batch_size']})")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"timed optimizer steps (after the warm-up), default {DEFAULTS['steps']} (--quick: {QUICK['steps']})")
    ap.add_argument("--warmup", type=int, default=None,
                    help=f"untimed first steps, default {DEFAULTS['warmup']} (--quick: {QUICK['warmup']})")
    ap.add_argument("--stride", type=int, default=3, help="mapping.stride: map every stride-th student block")
    ap.add_argument("--mapping", default="selected", help="mapping.strategy (selected needs the packaged teacher)")
    ap.add_argument("--teacher-size", choices=["135m", *TEACHER_SHAPES], default="135m",
                    help="135m: the packaged SmolLM2 teacher; others: a random-init teacher of that shape")
    ap.add_argument("--objectives", action="store_true",
                    help="time FDD and each divergence against the plain kl step (objectives.py)")
    ap.add_argument("--targets", action="store_true",
                    help="time logits KD on top-k, exact and sampled targets of one cache (targets.py)")
    ap.add_argument("--vs-finetune", action="store_true",
                    help="distillation next to a stock fine-tune of the same student (finetune.py)")
    ap.add_argument("--quick", action="store_true",
                    help=f"--vs-finetune at the one-shot GPU size: seq len {QUICK['seq_len']}, batch "
                         f"{QUICK['batch_size']}, {QUICK['steps']} timed steps after {QUICK['warmup']} warm-up, "
                         f"sequences = batch x (warm-up + steps + 1), loader >= {QUICK['loader_seconds']:.0f} s "
                         "(the whole run, cache build included, sized for < 4 minutes on one H100); explicit "
                         "sizes override it")
    ap.add_argument("--chunk-tokens", type=int, default=None,
                    help="--vs-finetune: loss.chunk_tokens of the chunked children (default: the config's)")
    ap.add_argument("--student-vocab", type=int, default=None, metavar="N",
                    help=f"random-init teacher ({RANDOM_TEACHER_BLOCKS} blocks) and student ({RANDOM_STUDENT_BLOCKS} "
                         f"blocks) of SmolLM2-135M width with an N-token vocabulary (N >= {PACKAGED_VOCAB}), "
                         "instead of the packaged models")
    ap.add_argument("--bf16", action="store_true",
                    help="training.bf16=true (bf16 autocast) in every child, the stock fine-tune included")
    ap.add_argument("--loader-seconds", type=float, default=None,
                    help=f"the loader child reads >= 2 epochs and at least this long, default "
                         f"{DEFAULTS['loader_seconds']:.0f} (--quick: {QUICK['loader_seconds']:.0f})")
    ap.add_argument("--out", metavar="FILE.jsonl",
                    help="append a header line and one JSON line per finished child (written as each child ends)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    return ap


def parse_args(argv: list[str] | None = None, mode: str | None = None, description: str | None = None
               ) -> argparse.Namespace:
    """The command line, with the sizes resolved: an explicit value, else --quick's, else the default. `mode`
    (objectives | targets | vs-finetune) sets that run's flag, as its own script does."""
    ap = _parser(description or __doc__)
    args = ap.parse_args(argv)
    if mode in ("objectives", "targets", "vs-finetune"):
        setattr(args, mode.replace("-", "_"), True)
    if args.objectives + args.vs_finetune + args.targets > 1:
        ap.error("--objectives, --targets and --vs-finetune are separate runs")
    if args.quick and not args.vs_finetune:
        ap.error("--quick is a --vs-finetune size")
    if args.student_vocab is not None and args.student_vocab < PACKAGED_VOCAB:
        ap.error(f"--student-vocab must be >= {PACKAGED_VOCAB} (the packaged tokenizer's ids)")
    if args.student_vocab is not None and args.teacher_size != "135m":
        ap.error("--student-vocab builds its own teacher: leave --teacher-size out")
    if args.chunk_tokens is not None and args.chunk_tokens < 1:
        ap.error("--chunk-tokens must be >= 1 (kd-dense is the chunk 0 run)")
    _resolve_sizes(args)
    args.run = ("objectives" if args.objectives else "targets" if args.targets else "vs-finetune" if args.vs_finetune
                else "compare")
    if args.out:
        args.out = str(Path(args.out).resolve())
    return args


def _resolve_sizes(args) -> None:
    small = args.student_vocab is not None
    preset = QUICK if args.quick else {**DEFAULTS, "seq_len": 128 if small else 256, "batch_size": 2 if small else 4}
    for key in ("seq_len", "batch_size", "steps", "warmup", "loader_seconds"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.sequences is None:
        args.sequences = args.batch_size * (args.warmup + args.steps + 1) if args.quick else DEFAULTS["sequences"]


# ----------------------------------------------------------------------------- the models and the cache


def setup(args, work: Path, cache_overrides: list[str]) -> str:
    """The student, the teacher path (args.teacher_path) and the cache in `work`; returns the models' description."""
    from pipeline.config import load_config
    from pipeline.phase_one import build_cache
    from pipeline.recipes.prune import run_prune

    if args.student_vocab is not None:
        vocab = {"vocab_size": args.student_vocab}
        teacher = harness.random_model(harness.smollm2_config(**vocab, num_hidden_layers=RANDOM_TEACHER_BLOCKS))
        args.teacher_path = harness.save_model(teacher, work / "teacher")
        student = harness.random_model(harness.smollm2_config(**vocab, num_hidden_layers=RANDOM_STUDENT_BLOCKS), seed=1)
        harness.save_model(student, work / "student")
        del teacher, student
        args.mapping = "uniform"  # no pruning.json: nothing for `selected` to read
        models = (f"teacher random-init SmolLM2-135M width, {RANDOM_TEACHER_BLOCKS} blocks, vocab "
                  f"{args.student_vocab}; student random-init, {RANDOM_STUDENT_BLOCKS} blocks, same vocab")
    else:
        args.teacher_path = harness.PACKAGED_TEACHER
        if args.teacher_size != "135m":
            teacher = harness.random_model(harness.smollm2_config(**TEACHER_SHAPES[args.teacher_size]))
            args.teacher_path = harness.save_model(teacher, work / f"teacher-{args.teacher_size}")
            del teacher
            if args.mapping == "selected":
                args.mapping = "uniform"  # the student's kept blocks index the packaged teacher, not this one
        # the student is the packaged SmolLM2 minus its 6 least important blocks
        run_prune(harness.PACKAGED_TEACHER, str(work / "student"), method="importance", remove="6",
                  calibration_sequences=16, heldout_sequences=0, progress=False, echo=lambda m: None)
        models = f"teacher {args.teacher_size} ({args.teacher_path}), student = SmolLM2-135M minus 6 blocks"
    build_cache(load_config(DEMO, overrides(args, work, args.teacher_path) + list(cache_overrides)))
    return models


# ----------------------------------------------------------------------------- the children


def ok(r: dict | None) -> bool:
    return r is not None and "error" not in r


def mem_key(r: dict) -> str:
    return "cuda_peak_allocated_mib" if "cuda_peak_allocated_mib" in r else "peak_rss_mib"


class Runner:
    """Runs the children one at a time (scripts/bench/train/children.py, through harness.run_child) and keeps
    the run's record: each child's result (or its error, with the tail of its stderr printed at once), and with
    --out one JSON line per event, appended before the next child starts."""

    def __init__(self, args, work: Path, run: str):
        from pipeline.config import load_config

        self.args, self.work, self.run = args, work, run
        self.results = Results(f"train.{MODULES.get(run, run)}", args.out)
        demo = load_config(DEMO)
        self.dtype, self.default_chunk = demo.student.dtype, demo.loss.chunk_tokens
        self.device = harness.device_name()
        self.notes: set[str] = set()  # printed once per run, not once per child

    def settings(self, mode: str, loss: list[str]) -> dict:
        """The settings of one child; chunk_tokens is the vocabulary chunk of a run_train child (0: dense)."""
        chunk = None
        if mode in ("cache", "online"):
            given = [int(x.split("=", 1)[1]) for x in loss if x.startswith("loss.chunk_tokens=")]
            chunk = given[-1] if given else self.default_chunk
        a = self.args
        return {"vocab": a.student_vocab or PACKAGED_VOCAB, "dtype": self.dtype, "bf16": a.bf16, "seq_len": a.seq_len,
                "batch_size": a.batch_size, "chunk_tokens": chunk, "device": self.device}

    def header(self, models: str, setup_s: float) -> None:
        import torch

        a = self.args
        print(f"{models}; {a.sequences} x {a.seq_len} tokens, batch {a.batch_size}, mapping {a.mapping} stride "
              f"{a.stride}; {a.steps} timed steps after {a.warmup} warm-up; bf16 {a.bf16}; torch threads "
              f"{torch.get_num_threads()}; device {self.device}; setup (models + cache build) {setup_s:.0f} s")
        self.results.add({"kind": "header", "run": self.run, "device": self.device, "models": models, "setup_s": setup_s,
                          "torch_threads": torch.get_num_threads(), "argv": sys.argv[1:],
                          "settings": {**self.settings("", []), "chunk_tokens": a.chunk_tokens or self.default_chunk,
                                       **{k: getattr(a, k) for k in CHILD_ARGS},
                                       "teacher_size": a.teacher_size, "quick": a.quick}})

    def child(self, name: str, mode: str, loss: list[str] | None = None, breakdown: bool = False) -> dict:
        """The child's result dict, or {"error": its stderr tail, "returncode": ...} when it failed."""
        loss = list(loss or [])
        settings = {k: getattr(self.args, k) for k in CHILD_SETTINGS}
        result = harness.run_child("scripts.bench.train.children", mode,
                                   {"settings": settings, "work": str(self.work), "loss": loss, "breakdown": breakdown})
        if not ok(result):
            print(f"  {name}: FAILED (exit {result['returncode']}, {result['child_s']:.0f} s); stderr tail:\n"
                  f"{result['error']}")
        for note in result.get("notes", []):
            if note not in self.notes:
                self.notes.add(note)
                print(f"  note: {note}")
        row = {"kind": "child", "run": self.run, "name": name, "mode": mode, "loss": loss,
               "settings": self.settings(mode, loss), "result": result, "case": name}
        if ok(result) and "step_s" in result:
            row["headline"] = {"s/step": result["step_s"], "peak MiB": result[mem_key(result)]}
        elif ok(result) and "tokens_per_s" in result:
            row["headline"] = {"loader tok/s": result["tokens_per_s"]}
        else:
            row["error"] = result["error"][-300:]
        self.results.add(row)
        return result


# ----------------------------------------------------------------------------- three rounds of variants


def run_rounds(runner: Runner, variants: list[tuple[str, list[str]]], column: str,
               extra: tuple[str, dict[str, str]] | None = None) -> dict[str, float]:
    """Each variant in three rounds (ABC ABC ABC), one cache child at a time; prints each child as it ends,
    then a table of the best of the three median step times and the largest peak memory, both against the
    first variant (anything else on the machine only ever adds time). `extra`: one more column (its header,
    its cell by variant).
    Returns the step times of the variants that finished."""
    runs: dict[str, list[dict]] = {name: [] for name, _ in variants}
    for i in range(1, 4):
        for name, loss in variants:
            r = runner.child(f"{name}, round {i}", "cache", loss)
            if ok(r):
                runs[name].append(r)
                print(f"  {name}, round {i}: {r['step_s']:.2f} s/step, {r[mem_key(r)]:.0f} MiB peak "
                      f"({r['child_s']:.0f} s child)")
    done = [r for rs in runs.values() for r in rs]
    if not done:
        print("every child failed")
        return {}
    step = {name: min(r["step_s"] for r in rs) for name, rs in runs.items() if rs}
    peak = {name: max(r[mem_key(done[0])] for r in rs) for name, rs in runs.items() if rs}
    print_rounds(variants, step, peak, mem_key(done[0]), column, extra)
    print("steps (s): " + "; ".join(f"{name}: " + " ".join(f"{s:.2f}" for r in rs for s in r["steps"])
                                     for name, rs in runs.items() if rs))
    return step


def print_rounds(variants, step: dict, peak: dict, mem: str, column: str, extra) -> None:
    ref = variants[0][0]
    more = f" {extra[0]} |" if extra else ""
    print(f"\n| {column} | step s (best of 3 medians) | vs {ref} | {mem.replace('_', ' ')} | vs {ref} |{more}")
    print("|---|---:|---:|---:|---:|" + ("---:|" if extra else ""))
    for name, _ in variants:
        cell = f" {extra[1].get(name, '')} |" if extra else ""
        if name not in step:
            print(f"| {name} | failed | | | |{cell}")
        elif ref not in step:
            print(f"| {name} | {step[name]:.2f} | n/a | {peak[name]:.0f} | n/a |{cell}")
        else:
            print(f"| {name} | {step[name]:.2f} | {step[name] / step[ref]:.3f} | {peak[name]:.0f} | "
                  f"{peak[name] / peak[ref]:.2f} |{cell}")


# ----------------------------------------------------------------------------- the loader's report

LOADER_GOAL = 3.0  # the cache DataLoader delivers >= 3x the tokens/s the training run consumes


def print_loader(ld: dict, consumer: str, r: dict | None, tok_step: int) -> None:
    """The loader's tokens/s against what `consumer` (a finished training child, or None) consumed, then the
    decode cost of each part."""
    dl = ld["dataloader"]
    line = (f"cache DataLoader with the training run's settings (batch {dl['batch_size']}, {dl['num_workers']} "
            f"workers, pin_memory {dl['pin_memory']}, prefetch_factor {dl['prefetch_factor']}): "
            f"{ld['tokens_per_s']:.0f} tokens/s over {ld['epochs']} epochs ({ld['seconds']:.1f} s)")
    if ok(r):
        consumed = tok_step / r["step_s"]
        ratio = ld["tokens_per_s"] / consumed
        line += (f" = {ratio:.1f}x what {consumer} consumes ({consumed:.0f} tokens/s = {tok_step} tokens / "
                 f"{r['step_s']:.3f} s per step); goal >= {LOADER_GOAL:.0f}x: "
                 f"{'met' if ratio >= LOADER_GOAL else 'missed'}")
    else:
        line += f" ({consumer} failed: no consumption to compare)"
    print(line)
    print_decode(ld["decode"])


def print_decode(d: dict) -> None:
    labels = {"base": "input_ids + Arrow record batch (every item)", "topk": f"top-k ids + logits (k {d['topk']})",
              "lse": f"lse ({d['lse_planes']} temperature planes)", "topk+lse": f"top-k ids + logits (k {d['topk']}) + lse"}

    def row(label: str, p: dict) -> str:
        per_core = f"{1e6 / p['cpu_us']:.0f}" if p["cpu_us"] > 0 else "n/a"
        return f"| {label} | {p['wall_us']:.2f} | {p['cpu_us']:.2f} | {per_core} |"

    print(f"decode cost per cached token position, this process, no workers (best of {d['rounds']} passes over the "
          f"train split's {d['tokens']} positions; a part = its reader pass minus the input_ids-only pass):")
    print("| part | µs/token (wall) | µs/token (CPU) | tokens/s per core (CPU) |\n|---|---:|---:|---:|")
    for key, p in d["parts"].items():
        label = labels.get(key, f"hidden layer {key.split()[-1]} ({d['hidden_codec']}, zarr)")
        print(row(label, p))
    total = {k: sum(p[k] for p in d["parts"].values()) for k in ("wall_us", "cpu_us")}
    print(row("sum: what a kd item decodes", total))
    print(row("whole item: CacheDataset + collate, DataLoader without workers", d["item"]))
    for note in d["notes"]:
        print(f"note: {note}")


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None, mode: str | None = None, description: str | None = None) -> None:
    """Parse, build the models and the cache in a temporary folder, run the mode's benchmark (its module's
    `run(args, runner)`), clean up."""
    sys.stdout.reconfigure(line_buffering=True)  # a run cut off by a time limit has printed all it finished
    args = parse_args(argv, mode, description)
    harness.quiet_transformers()
    bench = importlib.import_module(f"scripts.bench.train.{MODULES[args.run]}")
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        models = setup(args, work, getattr(bench, "CACHE_OVERRIDES", []))
        runner = Runner(args, work, args.run)
        runner.header(models, time.perf_counter() - started)
        bench.run(args, runner)
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
