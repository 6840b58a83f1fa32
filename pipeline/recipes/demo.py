"""`distill demo`: the whole chain on the embedded real model, offline, top to bottom.

    1. prune    the packaged SmolLM2 teacher minus its 6 least important blocks -> runs/demo/student
    2. cache    phase one over the packaged Wikipedia leads (configs/demo.yaml), with the teacher layers the
                student's layer map needs; verify; print `cache info`
    3. train    phase two from the cache alone: student + projectors -> runs/demo/train
    4. score    held-out perplexity (the cache's held-out rows) of the teacher, the pruned student and the
                distilled student, KL to the teacher, and the share of the perplexity gap recovered

Every step is the same code as its CLI command; a rerun reuses a finished cache with the same fingerprint.
"""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cache.manifest import write_json_atomic
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.recipes.cache import build_cache, cache_info, verify_cache
from pipeline.recipes.prune import run_prune
from pipeline.recipes.train import run_train

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
REMOVE_BLOCKS = 6
CALIBRATION_SEQUENCES = 32


def _echo(msg: str) -> None:
    click.echo(msg, err=True)


def heldout_rows(cache_dir: str):
    """(input ids [N, T], lengths [N] or None) of the cache's held-out split."""
    import numpy as np

    from pipeline.cache import open_cache

    c = open_cache(cache_dir, layers=[])
    rows = [c[i] for i in c.indices("heldout")]
    if not rows:
        raise PipelineError(f"{cache_dir} has no held-out sequences to score (data.heldout_fraction is 0)")
    ids = np.stack([r["input_ids"] for r in rows])
    lengths = np.array([r["length"] for r in rows]) if "length" in rows[0] else None
    return ids, lengths


def score(cfg, student_before: str, student_after: str) -> dict:
    """Held-out perplexity and KL(teacher || model) of the teacher, the pruned and the distilled student."""
    from transformers import AutoModelForCausalLM

    from pipeline.evaluate.perplexity import heldout_scores
    from pipeline.sources.models import load_model

    ids, lengths = heldout_rows(cfg.cache.dir)
    teacher, _ = load_model(cfg.teacher.model, cfg.teacher.dtype, cfg.teacher.revision)
    students = {name: AutoModelForCausalLM.from_pretrained(path).eval()
                for name, path in (("pruned", student_before), ("distilled", student_after))}
    s = heldout_scores(teacher, students, ids, lengths, batch_size=4)
    result = {"heldout_sequences": int(len(ids)), "seq_len": int(ids.shape[1]),
              "teacher": s["reference"], "pruned": s["pruned"], "distilled": s["distilled"]}
    gap = s["pruned"]["perplexity"] - s["reference"]["perplexity"]
    result["perplexity_gap_recovered"] = (s["pruned"]["perplexity"] - s["distilled"]["perplexity"]) / gap if gap > 0 else None
    return result


def run_demo(config: str | Path = DEMO_CONFIG, overrides: tuple[str, ...] = (), remove: int = REMOVE_BLOCKS,
             calibration_sequences: int = CALIBRATION_SEQUENCES) -> dict:
    """prune -> cache -> train -> score; returns what it writes to training.output_dir/demo.json."""
    cfg = load_config(config, overrides)
    if cfg.student.model is None:
        raise PipelineError("the demo config needs student.model: the folder its prune step writes")
    student = cfg.student.model
    if Path(student).exists() and not Path(student, "pruning.json").is_file():
        raise PipelineError(f"student.model {student} exists and was not written by `distill prune`; "
                            "the demo writes its student there: choose another folder")
    out = Path(cfg.training.get("output_dir", "runs/train"))

    source = cfg.data.sources[0]
    _echo(f"[1/4] prune: {cfg.teacher.model} minus its {remove} least important blocks -> {student}")
    run_prune(cfg.teacher.model, student, method="importance", remove=str(remove), dtype=cfg.teacher.dtype,
              calibration=source.path, text_field=source.text_field or cfg.data.text_field,
              calibration_sequences=calibration_sequences, seq_len=cfg.data.seq_len, heldout_sequences=0,
              seed=cfg.data.seed, overwrite=True, echo=_echo)

    _echo(f"[2/4] cache: teacher {cfg.teacher.model}, {cfg.data.num_sequences} x {cfg.data.seq_len} tokens "
          f"-> {cfg.cache.dir}")
    build_cache(cfg)
    verify_cache(cfg.cache.dir)
    cache_info(cfg.cache.dir)

    _echo(f"[3/4] train from the cache -> {out}")
    summary = run_train(cfg, echo=_echo)

    _echo("[4/4] held-out perplexity (the cache's held-out rows)")
    result = score(cfg, student, str(out / "student"))
    result["train"] = summary["metrics"]
    rows = [("teacher", result["teacher"]), ("pruned student", result["pruned"]),
            ("distilled student", result["distilled"])]
    click.echo(f"\n{'model':<20} {'perplexity':>11} {'KL to teacher':>14}")
    for name, r in rows:
        click.echo(f"{name:<20} {r['perplexity']:>11.2f} {r['kl']:>14.4f}")
    if result["perplexity_gap_recovered"] is not None:
        click.echo(f"perplexity gap recovered: {100 * result['perplexity_gap_recovered']:.1f}% "
                   f"after {summary['metrics'].get('global_step')} steps")
    path = out / "demo.json"
    write_json_atomic(path, result)
    _echo(f"{path} written")
    return result
