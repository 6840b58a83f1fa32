"""`distill ablate CONFIG`: many training variants over ONE teacher cache, evaluated and compared.

Top to bottom:
    1. the base config and every variant (the base with the variant's "section.key" overrides), each checked
       before anything runs: known keys and values, loss names, training arguments, the student, its layer
       map, the loss temperature and teacher layers against the cache (or, when it is still to be built,
       against what the build will store)
    2. the cache, built once if it is missing (cache.layers auto -> the union of the layers every variant's
       map needs); a finished cache is never rebuilt, and training never loads the teacher
    3. the teacher's scores, once (output_dir/baseline/teacher.json)
    4. per variant, each in its own process: `distill train` into output_dir/<name>/, the untrained
       student's scores once per student (baseline/pruned.json), then `distill eval` of the trained one
       (held-out perplexity and KL from the cache's held-out split, the benchmarks in ablate.eval.tasks);
       a crash (or out-of-memory kill) fails that variant only; a finished variant (variant.json) is
       skipped on rerun; an unfinished one resumes from its newest checkpoint-* (training.save_strategy)
       when it started with the same config, eval settings and cache, and restarts from scratch otherwise
    5. ablation.json, ablation.md (the chapter's Table 6.2) and ablation.png in output_dir
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import click
import yaml

from pipeline.atomic import write_file_atomically, write_json_atomic, write_text_atomic
from pipeline.blocks import text_config
from pipeline.cache.manifest import MANIFEST, check_format, read_json
from pipeline.cache.storage import Storage
from pipeline.config import Config, config_from_dict, load_config_data, set_key
from pipeline.errors import PipelineError
from pipeline.sources import models
from pipeline.student.layer_map import build_layer_map, read_kept_layers

# what the one cache holds: a variant that changed these would need another cache
SHARED_SECTIONS = ("teacher", "data", "cache", "ablate", "eval")
VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # no dots: never ablation.json, *.tmp, ...
RESERVED = ("baseline",)
MARKER = "variant.json"  # a finished variant
STARTED = "variant-started.json"  # the identity an unfinished variant started with: its checkpoints resume it
BUILD_RECORD = "cache_build.json"
LOG_TAIL = 15
CHILD_STOP_SECONDS = 30  # a stopped child gets this long to exit on SIGTERM before SIGKILL


def _variant_data(base: dict, name: str, overrides: Any) -> dict:
    if not isinstance(name, str) or not VARIANT_NAME.match(name) or name in RESERVED:
        raise PipelineError(f"ablate.variants: {name!r} is not a usable variant name (letters, digits, _ and -; "
                            f"not {', '.join(RESERVED)})")
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, dict):
        raise PipelineError(f"ablate.variants.{name}: expected a mapping of section.key: value, got {overrides!r}")
    data = copy.deepcopy(base)
    data.pop("ablate", None)
    for key, value in overrides.items():
        keys = [k for k in str(key).split(".") if k]
        if len(keys) < 2:
            raise PipelineError(f"ablate.variants.{name}: {key!r} is not section.key")
        if keys[0] in SHARED_SECTIONS:
            raise PipelineError(f"ablate.variants.{name}: {key} cannot vary: every variant trains from the one "
                                f"cache, so {', '.join(SHARED_SECTIONS[:3])} are shared (run another ablation for it)")
        if keys == ["training", "output_dir"]:
            raise PipelineError(f"ablate.variants.{name}: training.output_dir is set by the runner "
                                "(ablate.output_dir/<variant>)")
        set_key(data, keys, value, f"ablate.variants.{name}")
    return data


def _variant_config(data: dict, name: str) -> Config:
    try:
        return config_from_dict(data)
    except PipelineError as e:
        raise PipelineError(f"variant {name}: {e}") from None


def check_variants(base: Config, base_data: dict, manifest: dict | None
                   ) -> tuple[dict[str, dict], dict[str, str], list[int]]:
    """Every variant's config data, checked; each variant's student; and the teacher layers the cache must
    hold for all of them."""
    from pipeline.data.sequences import heldout_count
    from pipeline.evaluate.benchmarks import check_limit, check_tasks
    from pipeline.sources.digest import tokenizer_digest
    from pipeline.student.projectors import PROJECTOR_INITS, PROJECTOR_KINDS
    from pipeline.train import checks
    from pipeline.train.arguments import training_arguments
    from pipeline.train.teacher_side import TeacherFacts, planned_facts

    variants = base.ablate.variants
    if not variants:
        raise PipelineError("ablate.variants is empty: list at least one variant ({name: {section.key: value}})")
    if base.ablate.eval.tasks:
        check_tasks(base.ablate.eval.tasks)
    check_limit(base.ablate.eval.limit, list(base.ablate.eval.tasks), "ablate.eval.limit")
    if manifest is not None:
        check_format(manifest, f"the cache {base.cache.dir}", "delete it and rerun: the ablation rebuilds it")
        if manifest["teacher"]["model"] != base.teacher.model:
            raise PipelineError(f"the cache {base.cache.dir} holds teacher {manifest['teacher']['model']}, the config "
                                f"names {base.teacher.model}: the baseline scores would be of another model")
        if not manifest["split"]["heldout"][1] > manifest["split"]["heldout"][0]:
            raise PipelineError(f"the cache {base.cache.dir} has no held-out sequences to score the variants on")
        facts = TeacherFacts.from_manifest(manifest)
    else:
        if heldout_count(base.data.num_sequences, base.data.heldout_fraction) == 0:
            raise PipelineError("data.heldout_fraction gives no held-out sequences to score the variants on")
        facts = planned_facts(base)  # the cache this ablation will build
    out_dir = Path(base.ablate.output_dir)
    out, students, needed = {}, {}, set()
    for name, overrides in variants.items():
        data = _variant_data(base_data, name, overrides)
        cfg = _variant_config(data, name)
        run_dir = out_dir / name
        if run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / "config.yaml").is_file():
            raise PipelineError(f"{run_dir} exists and was not written by `distill ablate`; choose another "
                                "ablate.output_dir or variant name")
        try:
            source = facts.source(cfg.loss.logits_source)
            loss = dataclasses.replace(cfg.loss, logits_source=source.name).checked(source)
            PROJECTOR_INITS.get(cfg.mapping.projector_init)
            training_arguments({**cfg.training, "output_dir": str(run_dir)})
            if cfg.student.model is None:
                raise PipelineError("student.model is not set: name the pruned student's HF folder")
            scfg = text_config(models.load_config(cfg.student.model))
            layer_map = build_layer_map(cfg.mapping.strategy, scfg.num_hidden_layers, facts.num_layers,
                                        cfg.mapping.stride, read_kept_layers(cfg.student.model))
            checks.check_dynamics_map(loss, layer_map)
            PROJECTOR_KINDS.get(cfg.mapping.projector)(scfg.hidden_size, facts.hidden_size)
            student_tok = None
            if models.has_tokenizer(cfg.student.model):
                student_tok = tokenizer_digest(models.load_tokenizer(cfg.student.model))
            checks.check_all(facts=facts, student_vocab=scfg.vocab_size, student_tokenizer_digest=student_tok,
                             layer_map=layer_map, loss=loss,
                             student_positions=getattr(scfg, "max_position_embeddings", None))
        except PipelineError as e:
            raise PipelineError(f"variant {name}: {e}") from None
        if loss.needs_states:
            needed |= set(layer_map.values())
        out[name], students[name] = data, cfg.student.model
    return out, students, sorted(needed)


def _build_record(out: Path, digest: str | None) -> dict | None:
    """The cache build's cost when this ablation built the cache it used; None otherwise."""
    path = out / BUILD_RECORD
    try:
        record = read_json(path) if path.is_file() else None
    except PipelineError:
        return None
    return record if record is not None and record.get("fingerprint_digest") == digest else None


def _tail(path: Path, n: int = LOG_TAIL) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _run(args: list[str], log: Path, append: bool = False) -> tuple[int, float]:
    """Run `python -m pipeline.cli ARGS` in its own process, output to `log` (or after it); (exit code, seconds).
    When this process is stopped (Ctrl-C, or SIGTERM through `_stop_children_on_sigterm`), the child is stopped
    too: an orphaned training would go on writing into the variant's folder beside the next run's."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    with open(log, "a" if append else "w") as fh:
        child = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], stdout=fh, stderr=subprocess.STDOUT,
                                 env=env, stdin=subprocess.DEVNULL)
        try:
            rc = child.wait()
        except BaseException:
            child.terminate()
            try:
                child.wait(timeout=CHILD_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            raise
    return rc, time.perf_counter() - t0


@contextlib.contextmanager
def _stop_children_on_sigterm():
    """SIGTERM ends this process by SystemExit (exit status 143) instead of at once, so `_run` stops its child
    first. Only the main thread can set a handler; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _eval_args(model: str, cache_dir: str, ev, out: Path, dtype: str = "float32", revision: str | None = None
               ) -> list[str]:
    from pipeline.evaluate.benchmarks import format_limit

    args = ["eval", "--model", model, "--heldout", cache_dir, "--out", str(out), "--dtype", dtype,
            "--tasks", ",".join(ev.tasks) if ev.tasks else "none", "--batch-size", str(ev.batch_size)]
    if ev.limit:
        args += ["--limit", format_limit(ev.limit)]
    if revision:
        args += ["--revision", revision]
    return args


def _still_valid(path: Path, model: str, ev, digest: str | None) -> bool:
    """A kept baseline eval counts only for the same model, cache, tasks and limit."""
    try:
        r = read_json(path)
    except PipelineError:
        return False
    return (r.get("model") == model and r.get("limit") == ev.limit and sorted(r.get("tasks", {})) == sorted(ev.tasks)
            and (r.get("heldout") or {}).get("cache_fingerprint") == digest)


def _baseline_eval(model: str, path: Path, base: Config, digest: str | None, echo, dtype: str = "float32",
                   revision: str | None = None) -> tuple[bool, str]:
    """Eval JSON of an untrained model at `path`, computed once (kept for reruns); (ok, log tail)."""
    if path.is_file() and _still_valid(path, model, base.ablate.eval, digest):
        return True, ""
    path.parent.mkdir(parents=True, exist_ok=True)
    echo(f"baseline: evaluating {model}")
    log = path.with_suffix(".log")
    rc, _ = _run(_eval_args(model, base.cache.dir, base.ablate.eval, path, dtype, revision), log)
    return rc == 0, "" if rc == 0 else _tail(log)


def _pruned_path(out: Path, students: list[str], student: str) -> Path:
    name = "pruned.json" if len(students) == 1 else f"pruned-{students.index(student)}.json"
    return out / "baseline" / name


def _summary_metrics(result: dict) -> dict[str, Any]:
    from pipeline.evaluate.metrics import primary_metric

    h = result.get("heldout") or {}
    m: dict[str, Any] = {"heldout_perplexity": h.get("perplexity"), "heldout_kl": h.get("kl_to_teacher")}
    for task, t in result.get("tasks", {}).items():
        metric = primary_metric(t)
        m[task] = t[metric]
        m[f"{task}_stderr"] = t.get(f"{metric}_stderr")
    return m


def variant_identity(data: dict, eval_cfg, digest: str | None) -> Any:
    """What a variant's result depends on: its whole resolved config, the eval settings and the cache, in
    JSON form (so a marker read back from disk compares equal, int mapping keys included)."""
    return json.loads(json.dumps({"config": data, "eval": dataclasses.asdict(eval_cfg), "cache": digest},
                                 sort_keys=True, default=str))


def _run_variant(name: str, data: dict, student: str, base: Config, out: Path, teacher_json: Path,
                 pruned_json: Path, digest: str | None, echo) -> dict:
    run_dir = out / name
    marker = run_dir / MARKER
    overrides = base.ablate.variants[name] or {}
    identity = variant_identity(data, base.ablate.eval, digest)
    if marker.is_file():  # finished, but under another identity (run_ablate skips those that finished under this one)
        echo(f"variant {name}: its config, the eval settings or the cache changed since it ran: running it again")
    checkpoint = _resumable(run_dir, identity)
    if checkpoint is None:  # a new variant, or one interrupted before its first checkpoint: from scratch
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        data = copy.deepcopy(data)
        set_key(data, ["training", "output_dir"], str(run_dir), name)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        write_json_atomic(run_dir / STARTED, {"identity": identity})
    record: dict[str, Any] = {"variant": name, "overrides": overrides, "cache_fingerprint": digest,
                              "identity": identity}

    what = ', '.join(f'{k}={v}' for k, v in overrides.items()) or 'base config'
    train_args = ["train", str(run_dir / "config.yaml")]
    if checkpoint is None:
        echo(f"variant {name}: training ({what})")
    else:
        echo(f"variant {name}: resuming its training from {checkpoint} ({what})")
        train_args += ["--resume", str(checkpoint)]
    record["resumed_from"] = str(checkpoint) if checkpoint is not None else None  # train_seconds: this process only
    rc, record["train_seconds"] = _run(train_args, run_dir / "train.log", append=checkpoint is not None)
    if rc != 0:
        record.update(status="failed", stage="train", exit_code=rc, log_tail=_tail(run_dir / "train.log"))
        echo(f"variant {name}: training FAILED (exit {rc}); see {run_dir / 'train.log'}")
        return record  # no marker: a rerun tries it again
    # the untrained student's scores, once per student (a student that cannot be scored fails its variants)
    ok, tail = _baseline_eval(student, pruned_json, base, digest, echo)
    if not ok:
        record.update(status="failed", stage="baseline", log_tail=tail)
        echo(f"variant {name}: evaluating the untrained student FAILED; see {pruned_json.with_suffix('.log')}")
        return record
    (run_dir / "eval").mkdir(exist_ok=True)
    student_json = run_dir / "eval" / "student.json"
    echo(f"variant {name}: evaluating")
    rc, record["eval_seconds"] = _run(_eval_args(str(run_dir / "student"), base.cache.dir, base.ablate.eval,
                                                 student_json), run_dir / "eval.log")
    if rc != 0:
        record.update(status="failed", stage="eval", exit_code=rc, log_tail=_tail(run_dir / "eval.log"))
        echo(f"variant {name}: eval FAILED (exit {rc}); see {run_dir / 'eval.log'}")
        return record
    # the run dir is a complete `distill report` input: teacher and pruned scores beside the student's
    shutil.copy2(teacher_json, run_dir / "eval" / "teacher.json")
    shutil.copy2(pruned_json, run_dir / "eval" / "pruned.json")
    record["status"] = "done"
    write_json_atomic(marker, record)
    for folder in run_dir.glob("checkpoint-*"):  # only for resuming; the trained student is in student/
        shutil.rmtree(folder, ignore_errors=True)
    return record


def _finished(run_dir: Path, identity: Any) -> dict | None:
    """The record of a variant that finished with this same identity (config, eval settings, cache); None
    when it has not, or finished with another."""
    marker = run_dir / MARKER
    if not marker.is_file():
        return None
    done = read_json(marker)
    return done if done.get("identity") == identity else None


def _resumable(run_dir: Path, identity: Any) -> Path | None:
    """The newest whole checkpoint of an interrupted variant that started with this same identity (one whose
    save a kill cut short is passed over); None otherwise."""
    from pipeline.train.trainer_adapter import last_whole_checkpoint

    try:
        started = read_json(run_dir / STARTED) if (run_dir / STARTED).is_file() else None
    except PipelineError:
        return None
    if started is None or started.get("identity") != identity or not (run_dir / "config.yaml").is_file():
        return None
    last = last_whole_checkpoint(run_dir)[0]
    return Path(last) if last is not None else None


def _row(record: dict, out: Path) -> dict:
    from pipeline.evaluate.metrics import recovery_metrics

    row = {k: record.get(k) for k in ("variant", "overrides", "status", "train_seconds", "eval_seconds", "resumed_from")}
    if record.get("status") == "pending":
        return row
    if record.get("status") != "done":
        row.update(stage=record.get("stage"), log_tail=record.get("log_tail"))
        return row
    run_dir = out / record["variant"]
    student = read_json(run_dir / "eval" / "student.json")
    teacher = read_json(run_dir / "eval" / "teacher.json")
    pruned = read_json(run_dir / "eval" / "pruned.json")
    run = read_json(run_dir / "run.json")
    row["metrics"] = {**_summary_metrics(student), "eval_loss": run["metrics"].get("eval_loss_after")}
    try:
        recovery = recovery_metrics(teacher, pruned, student)
    except PipelineError as e:
        row.update(status="failed", stage="metrics", log_tail=str(e))
        return row
    row["recovery"] = {k: v for k, v in recovery.items() if k != "tasks"}
    row["steps"] = run["metrics"].get("global_step")
    row["resources"] = {**(run.get("resources") or {}), "train_loop_seconds": run["metrics"].get("train_seconds")}
    return row


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def ablation_markdown(result: dict) -> str:
    tasks = result["tasks"]
    head = ["variant", "overrides", "held-out PPL", "KL to teacher", "eval loss", *tasks,
            "PPL recovery", "KL recovery", "capability retention", "train s"]
    lines = [f"# Ablation over one cache ({result['cache']})", "",
             f"Held-out perplexity and KL(teacher || model) at T = 1 on the cache's {result['heldout_sequences']} "
             f"held-out sequences (KL over {result.get('heldout_kl_support') or 'the top-k ids plus an exact tail bucket'}); "
             "benchmarks: lm-eval stock tasks, "
             f"packaged validation splits, limit {result['limit']}, primary metric (acc_norm where reported) ± stderr. "
             "eval loss is each variant's own held-out compound loss (not comparable across loss settings); "
             "train s is the training process's wall time (a resumed variant's: its last process, after the "
             "checkpoint).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    b = result["baseline"]
    for label, m in (("teacher", b["teacher"]), ("pruned (untrained)", b["pruned"])):
        if m is None:
            continue
        cells = [label, "", _num(m["heldout_perplexity"], ".2f"), _num(m["heldout_kl"], ".4f"), ""]
        cells += [_pct(m.get(t)) for t in tasks] + ["", "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    for r in result["rows"]:
        overrides = ", ".join(f"{k}={v}" for k, v in (r["overrides"] or {}).items()) or "(base)"
        if r["status"] == "pending":
            lines.append(f"| {r['variant']} | {overrides} | not finished yet |" + " |" * (len(head) - 3))
            continue
        if r["status"] != "done":
            lines.append(f"| {r['variant']} | {overrides} | failed in {r.get('stage')} |" + " |" * (len(head) - 3))
            continue
        m, rec = r["metrics"], r["recovery"]
        cells = [r["variant"], overrides, _num(m["heldout_perplexity"], ".2f"), _num(m["heldout_kl"], ".4f"),
                 _num(m["eval_loss"], ".4f")]
        cells += [_pct(m.get(t)) + (f" ± {100 * m[t + '_stderr']:.1f}" if m.get(t + "_stderr") else "") for t in tasks]
        cells += [_pct(rec.get("ppl_recovery")), _pct(rec.get("kl_recovery")), _pct(rec.get("capability_retention")),
                  _num(r["train_seconds"], ".0f") + (" (resumed)" if r.get("resumed_from") else "")]
        lines.append("| " + " | ".join(cells) + " |")
    if result["failed"]:
        lines += ["", "Failed variants (rerun `distill ablate` to retry them):", ""]
        for r in result["rows"]:
            if r["status"] == "failed":
                lines += [f"- {r['variant']} ({r.get('stage')}):", "", "```", r.get("log_tail") or "", "```"]
    return "\n".join(lines) + "\n"


def run_ablate(config: str | Path, overrides: tuple[str, ...] = (), echo: Callable[[str], None] | None = None) -> dict:
    """Run (or resume) the ablation; returns what it writes to ablation.json. Stopped by SIGTERM or Ctrl-C, it
    stops its running child first; a rerun resumes (finished variants kept, the interrupted one from its last
    checkpoint)."""
    with _stop_children_on_sigterm():
        return _ablate(config, overrides, echo or (lambda msg: click.echo(msg, err=True)))


def _ablate(config: str | Path, overrides: tuple[str, ...], echo: Callable[[str], None]) -> dict:
    # 1. base config and every variant, checked before anything runs
    base_data = load_config_data(config, overrides)
    base = config_from_dict(copy.deepcopy(base_data))
    out = Path(base.ablate.output_dir)
    store = Storage(base.cache.dir, base.cache.storage_options, what="cache.dir")  # a folder or an fsspec URL
    manifest = store.read_json(MANIFEST) if store.isfile(MANIFEST) else None
    variants, student_of, needed = check_variants(base, base_data, manifest)
    students = sorted(set(student_of.values()))
    echo(f"ablate: {len(variants)} variants ({', '.join(variants)}) over the cache {base.cache.dir} -> {out}")

    # 2. the cache, once, in its own process (the teacher's memory is gone before any variant trains)
    out.mkdir(parents=True, exist_ok=True)
    if manifest is None:
        build = copy.deepcopy(base_data)
        build.pop("ablate", None)
        if base.cache.layers == "auto":
            set_key(build, ["cache", "layers"], needed, "cache.layers")
        (out / "cache.yaml").write_text(yaml.safe_dump(build, sort_keys=False))
        echo(f"cache: building {base.cache.dir} once for all variants (teacher layers {needed}); log {out / 'cache.log'}")
        rc, seconds = _run(["cache", "build", str(out / "cache.yaml")], out / "cache.log")
        if rc != 0 or not store.isfile(MANIFEST):
            raise PipelineError(f"building the cache failed (exit {rc}); see {out / 'cache.log'}:\n"
                                f"{_tail(out / 'cache.log')}")
        echo(f"cache: built in {seconds:.0f} s")
        manifest = store.read_json(MANIFEST)
        # the one build's cost, kept for reruns: wall time, and the largest child's peak RSS (the build's
        # process; ru_maxrss of children, which includes this small parent's RSS at the fork)
        write_json_atomic(out / BUILD_RECORD, {"seconds": seconds, "fingerprint_digest": manifest.get("fingerprint_digest"),
                                               "peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024})
    else:
        echo(f"cache: {base.cache.dir} exists (layers {manifest['layers']}); not rebuilt")
    digest = manifest.get("fingerprint_digest")

    # 3. the teacher's scores, once (each untrained student's, once, after its first variant trained)
    teacher_json = out / "baseline" / "teacher.json"
    ok, tail = _baseline_eval(base.teacher.model, teacher_json, base, digest, echo, base.teacher.dtype,
                              base.teacher.revision)
    if not ok:
        raise PipelineError(f"evaluating the teacher {base.teacher.model} failed; see "
                            f"{teacher_json.with_suffix('.log')}:\n{tail}")

    # 4. the variants, each in its own processes; the summary is rewritten before the first and after each, so
    # a long ablation shows what finished (and a stopped one keeps it) while the rest are still pending
    records = {name: _finished(out / name, variant_identity(data, base.ablate.eval, digest))
               or {"variant": name, "overrides": base.ablate.variants[name] or {}, "status": "pending"}
               for name, data in variants.items()}
    summary = partial(_write_summary, config, base, out, digest, teacher_json, students)
    result = summary(list(records.values()))
    for i, (name, data) in enumerate(variants.items(), 1):
        echo(f"[{i}/{len(variants)}] {name}")
        if records[name]["status"] == "done":
            echo(f"variant {name}: finished earlier, skipped")
            continue
        student = student_of[name]
        records[name] = _run_variant(name, data, student, base, out, teacher_json,
                                     _pruned_path(out, students, student), digest, echo)
        result = summary(list(records.values()))
    click.echo(ablation_markdown(result))
    echo(f"{out}: ablation.json, ablation.md{', ablation.png' if any(r['status'] == 'done' for r in result['rows']) else ''} "
         f"written; {len(result['failed'])} failed")
    return result


def _write_summary(config, base: Config, out: Path, digest: str | None, teacher_json: Path, students: list[str],
                   records: list[dict]) -> dict:
    """ablation.json, ablation.md and ablation.png from the variants' records so far (status done, failed or
    pending); returns what ablation.json holds."""
    teacher = read_json(teacher_json)
    pruned_files = [_pruned_path(out, students, s) for s in students]
    pruned = next((read_json(p) for p in pruned_files if p.is_file()), None)
    rows = [_row(r, out) for r in records]
    result = {
        "config": str(config), "cache": base.cache.dir, "cache_fingerprint": digest,
        "limit": base.ablate.eval.limit, "tasks": list(base.ablate.eval.tasks),
        "heldout_sequences": (teacher.get("heldout") or {}).get("sequences"),
        "heldout_kl_support": (teacher.get("heldout") or {}).get("kl_support"),
        "baseline": {"teacher": _summary_metrics(teacher),
                     "pruned": _summary_metrics(pruned) if pruned is not None else None,
                     "files": {"teacher": str(teacher_json),
                               **{s: str(p) for s, p in zip(students, pruned_files) if p.is_file()}}},
        "rows": rows, "failed": [r["variant"] for r in rows if r["status"] == "failed"],
        "pending": [r["variant"] for r in rows if r["status"] == "pending"],
        "cache_build": _build_record(out, digest),
    }
    write_json_atomic(out / "ablation.json", result)
    write_text_atomic(out / "ablation.md", ablation_markdown(result))
    figure = out / "ablation.png"
    if any(r["status"] == "done" for r in rows):
        from pipeline.evaluate.plots import plot_ablation

        write_file_atomically(figure, lambda tmp: plot_ablation(result, tmp), keep_suffix=True)
    else:
        figure.unlink(missing_ok=True)  # never a figure of an earlier run beside this run's table
    return result
