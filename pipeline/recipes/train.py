"""Phase two: train the student and its projectors from the cache alone (or, with online=True, from the
live teacher, for parity checks).

Reads top to bottom: training arguments, the student's shape (config only), the teacher side (the cache
manifest, or the live teacher), the layer map, the compatibility checks, the datasets, the student and
projectors, the Trainer loop, then the run directory:
    student/                 plain HF folder (+ the student's tokenizer, + pruning.json when there is one)
    projectors.safetensors   projectors.json
    trainer_state.json       run.json (resolved config, cache fingerprint, layer map, metrics)
    checkpoint-N/            Trainer checkpoints, each with its projectors
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import click
import torch

from pipeline.cache.storage import write_json_atomic
from pipeline.cache.storage import redact
from pipeline.errors import PipelineError
from pipeline.losses.hidden import NEEDS_NORM
from pipeline.resources import peak_memory
from pipeline.sources import models
from pipeline.sources.digest import tokenizer_digest
from pipeline.student.layer_map import build_layer_map, read_kept_layers
from pipeline.student.projectors import build_projectors, save_projectors
from pipeline.train import checks

# CPU-friendly defaults under the user's `training:` section (which wins)
TRAINING_DEFAULTS = {
    "output_dir": "runs/train",
    "report_to": "none",
    "logging_steps": 10,
    "dataloader_pin_memory": False,
    "save_total_limit": 2,
    "disable_tqdm": False,  # the CLI quiets transformers' logger, which would otherwise hide the step bar
    "ddp_find_unused_parameters": False,  # every student parameter takes part in the loss: skip DDP's graph scan
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def training_arguments(training: dict):
    """cfg.training -> TrainingArguments; an unknown key or a bad value is a one-line error."""
    from transformers import TrainingArguments

    known = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    unknown = sorted(set(training) - known)
    if unknown:
        raise PipelineError(f"unknown key training.{unknown[0]}: not a transformers.TrainingArguments field")
    kwargs = {**TRAINING_DEFAULTS, **training, "remove_unused_columns": False}
    types = {f.name: f.type for f in dataclasses.fields(TrainingArguments)}
    for key, value in kwargs.items():
        # YAML reads a bare `no` (save_strategy=no, eval_strategy=no) as False
        if value is False and "bool" not in str(types.get(key)):
            kwargs[key] = value = "no"
        # YAML reads 1e-4 (no dot) as a string; TrainingArguments does not convert it
        if isinstance(value, str) and str(types.get(key)) in ("float", "<class 'float'>"):
            try:
                kwargs[key] = float(value)
            except ValueError:
                raise PipelineError(f"training.{key}: expected a number, got {value!r}") from None
    try:
        return TrainingArguments(**kwargs)
    except (ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PipelineError(f"training: {first}") from None


def loss_spec(loss) -> "LossSpec":
    """cfg.loss -> a checked LossSpec (registry names, the divergence's parameters); one-line errors."""
    from pipeline.losses.spec import LossSpec

    return LossSpec(**{f.name: getattr(loss, f.name) for f in dataclasses.fields(LossSpec) if hasattr(loss, f.name)}).checked()


def resolve_logits_source(loss, cache_cfg=None, manifest: dict | None = None):
    """loss with logits_source resolved against what the teacher side holds (a cache manifest, or the online
    teacher's cache.* settings) and, for sampled targets, their proposal temperature; checked again (the
    divergence must have a sampled estimate). One-line errors."""
    if manifest is not None:
        mode = manifest.get("logits", "topk")
        proposal = (manifest.get("sampling") or {}).get("proposal_temperature")
        where = f"the cache holds cache.logits {mode}"
    else:
        mode, proposal = cache_cfg.logits, cache_cfg.proposal_temperature
        where = f"the online teacher is configured with cache.logits {mode}"
    source = loss.logits_source
    if source == "auto":
        source = "sampled" if mode == "sampled" else "topk"
    if source not in mode:
        raise PipelineError(f"loss.logits_source {source}: {where}; set loss.logits_source="
                            f"{'sampled' if mode == 'sampled' else 'topk'} or rebuild with cache.logits=topk+sampled")
    return dataclasses.replace(loss, logits_source=source,
                               proposal_temperature=float(proposal) if source == "sampled" else None).checked()


def check_dynamics_map(loss, layer_map: dict[int, int]) -> None:
    """loss.delta > 0 compares consecutive mapped blocks: the map must have at least two."""
    from pipeline.losses.dynamics import MIN_LAYERS

    if loss.delta > 0 and len(layer_map) < MIN_LAYERS:
        raise PipelineError(
            f"loss.delta > 0 ({loss.dynamics}) compares consecutive mapped student blocks, but the layer map "
            f"{dict(layer_map)} has {len(layer_map)}: map at least {MIN_LAYERS} (mapping.stride/strategy) or set loss.delta=0"
        )


def online_mean_square(capture, rows, batch_size: int, hidden_size: int) -> dict[int, float]:
    """The nmse constants without a cache: the live teacher's mean square per captured layer over the train
    rows (the same fp32 values a cache build sums), one no-grad pass before training."""
    import numpy as np

    from pipeline.cache.stats import SquareSums
    from pipeline.train.dataset import collate

    acc = SquareSums()
    for a in range(0, len(rows), batch_size):
        batch = collate([rows[i] for i in range(a, min(a + batch_size, len(rows)))])
        ids = batch["input_ids"]
        valid = torch.ones(ids.shape, dtype=torch.bool)
        if "length" in batch:
            valid = torch.arange(ids.shape[1])[None, :] < batch["length"][:, None]
        cap = capture(ids, valid.long() if "length" in batch else None, sequences=batch["sequence"].tolist())
        acc.add(cap.hidden, np.asarray(valid))
    return acc.mean_square(hidden_size)


def has_tokenizer(spec: str) -> bool:
    return Path(spec).is_dir() and any((Path(spec) / f).is_file() for f in TOKENIZER_FILES)


def run_train(cfg, online: bool = False, resume: str | None = None, callbacks=None, echo=None) -> dict:
    """Train; returns the run summary written to run.json (only rank 0 writes files)."""
    from transformers.trainer_utils import get_last_checkpoint

    from pipeline.train.dataset import CacheDataset, OnlineTeacherCollator, SequenceDataset, collate
    from pipeline.train.trainer import UniversalDistillationTrainer

    echo = echo or (lambda msg: click.echo(msg, err=True))

    # 1. training arguments and the loss (validated before anything heavy)
    args = training_arguments(cfg.training)
    loss = loss_spec(cfg.loss)
    out = Path(args.output_dir)
    if online and args.dataloader_num_workers:
        raise PipelineError("--online runs the teacher in the collator: set training.dataloader_num_workers=0")
    if resume == "latest":
        resume = get_last_checkpoint(str(out)) if out.is_dir() else None
        if resume is None:
            raise PipelineError(f"--resume: no checkpoint-* folder in {out}")
    elif resume is not None and not Path(resume).is_dir():
        raise PipelineError(f"--resume: checkpoint folder not found: {resume}")

    # 2. the student's shape, from its config only
    if cfg.student.model is None:
        raise PipelineError("student.model is not set: name the pruned student's HF folder")
    spec = cfg.student.model
    scfg = models.text_config(models.load_config(spec))
    n_student, d_student, v_student = scfg.num_hidden_layers, scfg.hidden_size, scfg.vocab_size
    kept = read_kept_layers(spec) if Path(spec).is_dir() else None
    student_tok = models.load_tokenizer(spec) if has_tokenizer(spec) else None

    # 3. the teacher's depth and width: the cache manifest (no teacher weights), or the live teacher's config
    if online:
        tcfg = models.text_config(models.load_config(cfg.teacher.model, cfg.teacher.revision))
        n_teacher, d_teacher = tcfg.num_hidden_layers, tcfg.hidden_size
    else:
        from pipeline.cache.reader import open_cache

        cache = open_cache(cfg.cache.dir, storage_options=cfg.cache.storage_options)
        manifest = cache.manifest
        n_teacher = int(manifest["teacher"]["num_layers"])
        d_teacher = int(manifest["teacher"]["hidden_size"])

    # which teacher targets the logits loss reads (auto: the cache's only kind, top-k when it holds both), and
    # for sampled ones their proposal temperature; the divergence is checked against the choice here
    loss = resolve_logits_source(loss, cfg.cache if online else None, None if online else manifest)
    if args.should_save:
        echo(f"loss: {loss.describe()}")

    # 4. layer map: student depth from its config, teacher depth from the manifest, kept blocks from pruning.json
    layer_map = build_layer_map(cfg.mapping.strategy, n_student, n_teacher, cfg.mapping.stride, kept)
    check_dynamics_map(loss, layer_map)
    needed = sorted(set(layer_map.values())) if loss.needs_states else []
    if online:  # now the live teacher, beside the student: online mode is the baseline that shares memory
        teacher, teacher_tok = models.load_model(cfg.teacher.model, cfg.teacher.dtype, cfg.teacher.revision)
        teacher.to(args.device)
        vocab = teacher.get_output_embeddings().weight.shape[0]
        manifest = {
            "teacher": {"model": cfg.teacher.model, "num_layers": n_teacher, "hidden_size": d_teacher,
                        "vocab_size": vocab},
            "seq_len": cfg.data.seq_len, "temperatures": [float(loss.temperature)],
            "layers": list(range(n_teacher + 1)),
            "fingerprint": {"tokenizer_digest": tokenizer_digest(teacher_tok)},
        }

    # 5. compatibility checks, before step one. From a cache, the sequence length (like every other data
    # property) is the manifest's: the YAML's data section describes how that cache was built.
    checks.check_all(
        manifest=manifest, student_vocab=v_student,
        student_tokenizer_digest=tokenizer_digest(student_tok) if student_tok is not None else None,
        layer_map=layer_map, need_hidden=loss.needs_states, temperature=loss.temperature, need_logits=True,
        seq_len=None, student_positions=getattr(scfg, "max_position_embeddings", None),
    )
    if not online and int(cfg.data.seq_len) != int(manifest["seq_len"]) and args.should_save:
        echo(f"note: data.seq_len {cfg.data.seq_len} is not used; the cache holds {manifest['seq_len']}-token sequences")

    # 6. datasets (and, online, the live-teacher collator)
    if online:
        from pipeline.data.sequences import sequences_from_config
        from pipeline.teacher.capture import TeacherCapture

        seqs = sequences_from_config(cfg.data, teacher_tok)
        cc = cfg.cache
        train_ds = SequenceDataset(seqs.input_ids, seqs.lengths, range(0, seqs.n_train), cc.shard_sequences, cc.chunk_sequences)
        eval_ds = SequenceDataset(seqs.input_ids, seqs.lengths, range(seqs.n_train, len(seqs)), cc.shard_sequences, cc.chunk_sequences)
        sampled = loss.logits_source == "sampled"
        temps = sorted({float(loss.temperature), float(loss.proposal_temperature)} if sampled else {float(loss.temperature)})
        capture = TeacherCapture(teacher, needed, 0 if sampled else cc.topk, temps, cc.logit_dtype,
                                 samples=cc.samples if sampled else 0, proposal_temperature=cc.proposal_temperature,
                                 sample_seed=cc.sample_seed)
        collator = OnlineTeacherCollator(capture, loss.temperature)
    else:
        # only what the loss reads: no hidden layers without gamma/delta, no top-k logits without beta
        so = cfg.cache.storage_options
        train_ds = CacheDataset(cfg.cache.dir, "train", needed, loss.temperature, logits=loss.beta > 0,
                                storage_options=so, source=loss.logits_source)
        eval_ds = CacheDataset(cfg.cache.dir, "heldout", needed, loss.temperature, logits=loss.beta > 0,
                               storage_options=so, source=loss.logits_source)
        capture, collator = None, collate
    if len(train_ds) == 0:
        raise PipelineError("the cache's train split is empty")
    if len(eval_ds) == 0 and args.eval_strategy != "no":
        raise PipelineError(f"training.eval_strategy is {args.eval_strategy.value} but the held-out split is empty "
                            "(data.heldout_fraction 0): set training.eval_strategy=no")
    hidden_norms = None
    if loss.gamma > 0 and loss.hidden in NEEDS_NORM:  # nmse: one constant per teacher layer, from the train split
        if online:
            hidden_norms = online_mean_square(capture, train_ds, cfg.cache.batch_size, d_teacher)
        else:
            hidden_norms = cache.hidden_mean_square(needed, progress=args.should_save)

    # 7. the student and one projector per mapped pair (seeded: same run, same projectors)
    student = models.load_weights(spec, cfg.student.dtype, what="student")
    if loss.chunk_tokens:
        from pipeline.losses.chunked import chunk_support

        why = chunk_support(student)
        if why:
            echo(f"note: loss.chunk_tokens: {why}; the vocabulary losses take the dense path")
            loss = dataclasses.replace(loss, chunk_tokens=0)
    projectors = build_projectors(layer_map, d_student, d_teacher, cfg.mapping.projector,
                                  cfg.mapping.projector_init, seed=args.seed)

    # 8. the loop. The held-out loss before training comes from eval_on_start: it runs after the Trainer has
    # wrapped the student (DDP under several processes). A plain evaluate() before train() would make
    # accelerate treat the bare student as prepared, and train() would then skip the DDP wrapper.
    if len(eval_ds) and resume is None:
        args.eval_on_start = True
    trainer = UniversalDistillationTrainer(
        model=student, args=args, train_dataset=train_ds, eval_dataset=eval_ds if len(eval_ds) else None,
        data_collator=collator, callbacks=callbacks, projectors=projectors, layer_map=layer_map, loss=loss,
        projector_lr_multiplier=cfg.mapping.projector_lr_multiplier, hidden_norms=hidden_norms,
    )
    mode = "online" if online else "cache"
    if args.should_save:
        echo(f"train ({mode}): student {spec} ({n_student} blocks) <- teacher {manifest['teacher']['model']} "
             f"({n_teacher} blocks); map {layer_map}; {len(train_ds)} train / {len(eval_ds)} held-out sequences")
    metrics: dict = {}
    try:
        started = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=resume)
        metrics["train_seconds"] = time.perf_counter() - started  # steps and in-run evaluations, this process
        start = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e and e.get("step") == 0]
        if start:
            metrics["eval_loss_before"] = start[0]
        metrics["train_loss"] = result.training_loss
        metrics["global_step"] = result.global_step
        if len(eval_ds):
            metrics["eval_loss_after"] = trainer.evaluate()["eval_loss"]
    finally:
        trainer.remove_hooks()
        if capture is not None:
            capture.close()

    # 9. the run directory (rank 0): student folder swapped in whole, projectors, state, run.json
    config = cfg.to_dict()
    config["cache"]["storage_options"] = redact(cfg.cache.storage_options)  # no credentials in run.json
    summary = {
        "mode": mode, "config": config, "student_source": spec,
        "layer_map": {str(j): t for j, t in layer_map.items()}, "metrics": metrics,
        "resumed_from": resume, "resources": peak_memory(),  # this process's peak (rank 0's under DDP)
    }
    if not online:
        summary["cache"] = {"dir": cfg.cache.dir, "seq_len": manifest["seq_len"], "topk": manifest["topk"],
                            "fingerprint": manifest.get("fingerprint"),
                            "fingerprint_digest": manifest.get("fingerprint_digest")}
    if hidden_norms is not None:
        summary["hidden_mean_square"] = {str(t): v for t, v in hidden_norms.items()}
    if args.should_save:
        out.mkdir(parents=True, exist_ok=True)
        tok = student_tok if student_tok is not None else (teacher_tok if online else _teacher_tokenizer(manifest))

        def write_student(tmp: Path) -> None:
            student.save_pretrained(tmp)
            if tok is not None:
                tok.save_pretrained(tmp)
            if Path(spec, "pruning.json").is_file():
                shutil.copy2(Path(spec, "pruning.json"), tmp / "pruning.json")

        models.write_folder_atomically(out / "student", write_student)
        save_projectors(projectors, out, {"global_step": trainer.state.global_step, "mode": mode})
        trainer.save_state()
        write_json_atomic(out / "run.json", summary)
        parts = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        echo(f"{out}: student/, projectors.*, trainer_state.json, run.json written ({parts})")
    return summary


def _teacher_tokenizer(manifest: dict):
    """The cache's teacher tokenizer (no weights), for a student folder that has none; None if unavailable."""
    try:
        return models.load_tokenizer(manifest["teacher"]["model"])
    except Exception:  # noqa: BLE001 - the student folder is still valid without it
        return None
