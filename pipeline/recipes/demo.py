"""`distill demo`: the whole chain on the embedded real model, offline, top to bottom.

    1. prune    the packaged SmolLM2 teacher minus its 6 least important blocks -> runs/demo/student
    2. cache    phase one over the packaged Wikipedia leads (configs/demo.yaml), with the teacher layers the
                student's layer map needs; verify; print `cache info`
    3. train    phase two from the cache alone: student + projectors -> runs/demo/train, with held-out
                evaluations (loss components, per-layer cosine) every training.eval_steps
    4. eval     teacher, pruned and distilled student: held-out perplexity and KL to the teacher from the
                cache's held-out split, and the `eval.tasks` benchmarks through lm-eval (first `eval.limit`
                items) -> runs/demo/train/eval/{teacher,pruned,student}.json
    5. report   report.md with the before/after table, recovery metrics and figures -> runs/demo/train/report

Every step is the same code as its CLI command; a rerun reuses a finished cache with the same fingerprint.
"""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.atomic import write_json_atomic
from pipeline.cache.directory import stored_record
from pipeline.cache.manifest import check_format
from pipeline.cache.storage import Storage
from pipeline.config import load_config
from pipeline.data.sequences import heldout_count
from pipeline.errors import PipelineError
from pipeline.evaluate import benchmarks
from pipeline.evaluate.benchmarks import check_limit, format_limit
from pipeline.evaluate.metrics import primary_metric, recovery_metrics
from pipeline.recipes.cache import build_cache, cache_info, verify_cache
from pipeline.recipes.evaluate import run_eval
from pipeline.recipes.prune import run_prune
from pipeline.recipes.report import run_report
from pipeline.recipes.train import run_train

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
REMOVE_BLOCKS = 6
CALIBRATION_SEQUENCES = 32
ROLES = (("teacher", "teacher"), ("pruned", "pruned student"), ("student", "distilled student"))


def _echo(msg: str) -> None:
    click.echo(msg, err=True)


def evaluate_all(cfg, student_before: str, student_after: str, eval_dir: Path) -> dict[str, dict]:
    """`distill eval` of teacher, pruned and distilled student -> eval_dir/{teacher,pruned,student}.json."""
    models = {"teacher": cfg.teacher.model, "pruned": student_before, "student": student_after}
    results = {}
    for role, label in ROLES:
        _echo(f"  {label}: {models[role]}")
        dtype, revision = (cfg.teacher.dtype, cfg.teacher.revision) if role == "teacher" else (cfg.student.dtype, None)
        results[role] = run_eval(models[role], tasks=list(cfg.eval.tasks), limit=cfg.eval.limit,
                                 heldout=cfg.cache.dir, batch_size=cfg.eval.batch_size, dtype=dtype,
                                 revision=revision, out=str(eval_dir / f"{role}.json"), echo=_echo)
    return results


def summary_table(results: dict[str, dict], recovery: dict) -> str:
    """The before/after table (Table 6.1 shape) printed at the end of the demo."""
    tasks = list(results["teacher"]["tasks"])
    head = ["model", "held-out PPL", "KL to teacher", *tasks]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]

    def num(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for role, label in ROLES:
        r = results[role]
        cells = [label, num(r["heldout"]["perplexity"], ".2f"), num(r["heldout"]["kl_to_teacher"], ".4f")]
        for t in tasks:
            task = r["tasks"][t]
            value = task[primary_metric(task)]
            cells.append(num(None if value is None else 100 * value, ".1f"))
        lines.append("| " + " | ".join(cells) + " |")
    parts = [f"{name} {100 * recovery[key]:.1f}%" for key, name in (
        ("ppl_recovery", "PPL recovery"), ("kl_recovery", "KL recovery"),
        ("capability_retention", "capability retention"), ("benchmark_recovery", "benchmark recovery"))
        if recovery.get(key) is not None]
    return "\n".join(lines) + ("\n" + ", ".join(parts) if parts else "")


def run_demo(config: str | Path = DEMO_CONFIG, overrides: tuple[str, ...] = (), remove: int = REMOVE_BLOCKS,
             calibration_sequences: int = CALIBRATION_SEQUENCES) -> dict:
    """prune -> cache -> train -> eval -> report; returns what it writes to training.output_dir/demo.json."""
    cfg = load_config(config, overrides)
    if cfg.student.model is None:
        raise PipelineError("the demo config needs student.model: the folder its prune step writes")
    student = cfg.student.model
    if Path(student).exists() and not Path(student, "pruning.json").is_file():
        raise PipelineError(f"student.model {student} exists and was not written by `distill prune`; "
                            "the demo writes its student there: choose another folder")
    out = Path(cfg.training.get("output_dir", "runs/train"))
    # the eval step's settings, checked before the first step runs
    benchmarks.parse_tasks(cfg.eval.tasks)
    check_limit(cfg.eval.limit, list(cfg.eval.tasks), "eval.limit")
    if heldout_count(cfg.data.num_sequences, cfg.data.heldout_fraction) == 0:
        raise PipelineError("data.heldout_fraction gives no held-out sequences: the demo scores on them")

    source = cfg.data.sources[0]
    _echo(f"[1/5] prune: {cfg.teacher.model} minus its {remove} least important blocks -> {student}")
    run_prune(cfg.teacher.model, student, method="importance", remove=str(remove), dtype=cfg.teacher.dtype,
              calibration=source.path, text_field=source.text_field or cfg.data.text_field,
              calibration_sequences=calibration_sequences, seq_len=cfg.data.seq_len, heldout_sequences=0,
              seed=cfg.data.seed, overwrite=True, echo=_echo)

    _echo(f"[2/5] cache: teacher {cfg.teacher.model}, {cfg.data.num_sequences} x {cfg.data.seq_len} tokens "
          f"-> {cfg.cache.dir}")
    # the demo's cache folder is its own: a cache there of another format or config (an older version of this
    # code, other defaults) is rebuilt, the same config's is kept; a folder that is not a cache is never touched
    try:
        check_format(stored_record(Storage(cfg.cache.dir, cfg.cache.storage_options, what="cache.dir")), cfg.cache.dir,
                     "rebuilding it")
    except PipelineError as e:
        _echo(f"      {e}")
    build_cache(cfg, overwrite=True)
    verify_cache(cfg.cache.dir)
    cache_info(cfg.cache.dir)

    _echo(f"[3/5] train from the cache -> {out}")
    summary = run_train(cfg, echo=_echo)

    _echo(f"[4/5] eval: held-out split of {cfg.cache.dir}; benchmarks {', '.join(cfg.eval.tasks) or 'none'} "
          f"(limit {format_limit(cfg.eval.limit)})")
    results = evaluate_all(cfg, student, str(out / "student"), out / "eval")
    recovery = recovery_metrics(results["teacher"], results["pruned"], results["student"])

    _echo(f"[5/5] report -> {out / 'report'}")
    run_report([str(out)], str(out / "report"), [], echo=_echo)

    result = {
        "heldout_sequences": results["teacher"]["heldout"]["sequences"], "seq_len": cfg.data.seq_len,
        "limit": cfg.eval.limit,
        **{("distilled" if role == "student" else role): {
            "perplexity": results[role]["heldout"]["perplexity"], "kl": results[role]["heldout"]["kl_to_teacher"],
            "tasks": {t: v[primary_metric(v)] for t, v in results[role]["tasks"].items()}} for role, _ in ROLES},
        "recovery": {k: v for k, v in recovery.items() if k != "tasks"},
        "train": summary["metrics"],
    }
    click.echo("\n" + summary_table(results, recovery))
    path = out / "demo.json"
    write_json_atomic(path, result)
    _echo(f"{path}, {out / 'eval'}/*.json and {out / 'report'}/report.md written")
    return result
