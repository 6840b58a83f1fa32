"""Phase two: train the student and its projectors from the cache alone (or, with online=True, from the
live teacher, for parity checks).

`run_train` reads as its numbered steps, each a private function below it in the same order: training
arguments and the loss, the student's shape (config only), the teacher side (the cache manifest, or the live
teacher), the layer map, the compatibility checks, the datasets, the student and projectors, the Trainer loop,
then the run directory:
    student/                 plain HF folder (+ the student's tokenizer, + pruning.json when there is one)
    projectors.safetensors   projectors.json
    trainer_state.json       run.json (resolved config, cache fingerprint, layer map, metrics)
    checkpoint-N/            Trainer checkpoints, each with its projectors
"""

from __future__ import annotations

import dataclasses
import shutil
import time
import typing
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
from pipeline.train.arguments import training_arguments

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


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
        where = f"cache.logits is {mode}"  # the online teacher's, or a cache still to be built
    source = loss.logits_source
    if source == "auto":
        source = "exact" if "exact" in mode else "sampled" if mode == "sampled" else "topk"
    if source not in mode:
        held = mode.split("+")[0]
        raise PipelineError(f"loss.logits_source {source}: {where}; set loss.logits_source={held} or rebuild with "
                            f"cache.logits=topk+{'exact' if source == 'exact' else 'sampled'}")
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
    echo = echo or (lambda msg: click.echo(msg, err=True))

    # 1. training arguments and the loss (validated before anything heavy), the checkpoint to resume from
    args = training_arguments(cfg.training, online=online)
    loss = loss_spec(cfg.loss)
    resume = _resume_checkpoint(resume, Path(args.output_dir))

    # 2. the student's shape, from its config only
    student = _student_shape(cfg.student)

    # 3. the teacher's depth and width: the cache manifest (no teacher weights), or the live teacher's config;
    # then which teacher targets the logits loss reads there
    teacher = _teacher_side(cfg, online)
    loss = resolve_logits_source(loss, cfg.cache if online else None, teacher.manifest)
    if args.should_save:
        echo(f"loss: {loss.describe()}")

    # 4. the layer map; online, the live teacher loads only now that the map is known to be valid
    layer_map = _layer_map(cfg.mapping, loss, student, teacher)
    if online:
        teacher = _live_teacher(cfg, args, loss, teacher)

    # 5. compatibility checks, before step one
    _check_compatibility(cfg, online, args, loss, student, teacher, layer_map, echo)

    # 6. datasets (and, online, the live-teacher collator), the nmse constants
    data = _datasets(cfg, online, args, loss, teacher, layer_map)

    # 7. the student and one projector per mapped pair
    model, projectors, loss = _student_and_projectors(cfg, args, loss, student, teacher, layer_map, echo)

    # 8. the loop
    trainer, metrics = _train_loop(cfg, online, args, resume, callbacks, loss, student, teacher, layer_map, data,
                                   model, projectors, echo)

    # 9. the run directory (rank 0): student folder swapped in whole, projectors, state, run.json
    summary = _summary(cfg, online, resume, student, teacher, layer_map, data, metrics)
    if args.should_save:
        _write_run_dir(Path(args.output_dir), online, student, teacher, model, projectors, trainer, summary, echo)
    return summary


@dataclasses.dataclass(frozen=True)
class _Student:
    """The student before its weights load: its source, text config, kept blocks and tokenizer (if any)."""

    spec: str
    config: typing.Any
    kept: list[int] | None
    tokenizer: typing.Any


@dataclasses.dataclass(frozen=True)
class _Teacher:
    """The teacher side: depth, width and the manifest the checks read (online: built by `_live_teacher`)."""

    n_layers: int
    width: int
    manifest: dict | None = None
    cache: typing.Any = None  # the open cache (cache runs)
    model: typing.Any = None  # the live teacher and its tokenizer (online runs, from step 4)
    tokenizer: typing.Any = None


@dataclasses.dataclass(frozen=True)
class _Data:
    """What the loop reads: the splits, the collator, the live teacher's capture (online) and the nmse constants."""

    train: typing.Any
    eval: typing.Any
    collator: typing.Any
    capture: typing.Any = None
    hidden_norms: dict[int, float] | None = None
    exact: typing.Any = None  # trainer.ExactTargets (loss.logits_source exact)


def _resume_checkpoint(resume: str | None, out: Path) -> str | None:
    """Step 1: --resume ("latest": the newest checkpoint-* in the output folder) -> a checkpoint folder, or None."""
    from transformers.trainer_utils import get_last_checkpoint

    if resume == "latest":
        resume = get_last_checkpoint(str(out)) if out.is_dir() else None
        if resume is None:
            raise PipelineError(f"--resume: no checkpoint-* folder in {out}")
    elif resume is not None and not Path(resume).is_dir():
        raise PipelineError(f"--resume: checkpoint folder not found: {resume}")
    return resume


def _student_shape(student) -> _Student:
    """Step 2: cfg.student -> its depth, width and vocab (config only), pruning.json's kept blocks, tokenizer."""
    if student.model is None:
        raise PipelineError("student.model is not set: name the pruned student's HF folder")
    spec = student.model
    return _Student(spec=spec, config=models.text_config(models.load_config(spec)),
                    kept=read_kept_layers(spec) if Path(spec).is_dir() else None,
                    tokenizer=models.load_tokenizer(spec) if has_tokenizer(spec) else None)


def _teacher_side(cfg, online: bool) -> _Teacher:
    """Step 3: the teacher's depth and width from the cache manifest (no teacher weights), or online from the
    live teacher's config (its weights load in step 4)."""
    if online:
        tcfg = models.text_config(models.load_config(cfg.teacher.model, cfg.teacher.revision))
        return _Teacher(n_layers=tcfg.num_hidden_layers, width=tcfg.hidden_size)
    from pipeline.cache.reader import open_cache

    cache = open_cache(cfg.cache.dir, storage_options=cfg.cache.storage_options)
    teacher = cache.manifest["teacher"]
    return _Teacher(n_layers=int(teacher["num_layers"]), width=int(teacher["hidden_size"]),
                    manifest=cache.manifest, cache=cache)


def _layer_map(mapping, loss, student: _Student, teacher: _Teacher) -> dict[int, int]:
    """Step 4: student block -> teacher layer; student depth from its config, teacher depth from the teacher
    side, kept blocks from pruning.json."""
    layer_map = build_layer_map(mapping.strategy, student.config.num_hidden_layers, teacher.n_layers, mapping.stride,
                                student.kept)
    check_dynamics_map(loss, layer_map)
    return layer_map


def _live_teacher(cfg, args, loss, teacher: _Teacher) -> _Teacher:
    """Step 4, online: the live teacher on the training device, beside the student (online mode is the baseline
    that shares memory), and the manifest the checks read, as a cache of it would hold."""
    model, tokenizer = models.load_model(cfg.teacher.model, cfg.teacher.dtype, cfg.teacher.revision)
    model.to(args.device)
    manifest = {
        "teacher": {"model": cfg.teacher.model, "num_layers": teacher.n_layers, "hidden_size": teacher.width,
                    "vocab_size": model.get_output_embeddings().weight.shape[0]},
        "seq_len": cfg.data.seq_len, "temperatures": [float(loss.temperature)],
        "layers": list(range(teacher.n_layers + 1)),
        "fingerprint": {"tokenizer_digest": tokenizer_digest(tokenizer)},
    }
    return dataclasses.replace(teacher, manifest=manifest, model=model, tokenizer=tokenizer)


def _check_compatibility(cfg, online: bool, args, loss, student: _Student, teacher: _Teacher,
                         layer_map: dict[int, int], echo) -> None:
    """Step 5: the compatibility checks, before step one (one-line errors). From a cache, the sequence length
    (like every other data property) is the manifest's: the YAML's data section describes how that cache was
    built, so a differing data.seq_len is only noted."""
    manifest = teacher.manifest
    checks.check_all(
        manifest=manifest, student_vocab=student.config.vocab_size,
        student_tokenizer_digest=tokenizer_digest(student.tokenizer) if student.tokenizer is not None else None,
        layer_map=layer_map, loss=loss, seq_len=None, student_positions=getattr(student.config, "max_position_embeddings", None),
    )
    if not online and int(cfg.data.seq_len) != int(manifest["seq_len"]) and args.should_save:
        echo(f"note: data.seq_len {cfg.data.seq_len} is not used; the cache holds {manifest['seq_len']}-token sequences")


def _datasets(cfg, online: bool, args, loss, teacher: _Teacher, layer_map: dict[int, int]) -> _Data:
    """Step 6: the train and held-out splits with only what the loss reads (no hidden layers without gamma/delta,
    no top-k logits without beta), the collator (online: the live teacher's), and for nmse one constant per
    teacher layer from the train split."""
    from torch.utils.data import Subset

    from pipeline.train.dataset import CacheDataset, collate

    needed = sorted(set(layer_map.values())) if loss.needs_states else []
    exact = _exact_targets(online, loss, teacher)
    if online:
        captured = sorted(set(needed) | ({exact.layer} if exact else set()))
        train_ds, eval_ds, capture, collator = _online_datasets(cfg, loss, teacher.model, teacher.tokenizer, captured)
    else:
        so = cfg.cache.storage_options
        train_ds = CacheDataset(cfg.cache.dir, "train", needed, loss.temperature, logits=loss.beta > 0,
                                storage_options=so, source=loss.logits_source)
        eval_ds = CacheDataset(cfg.cache.dir, "heldout", needed, loss.temperature, logits=loss.beta > 0,
                               storage_options=so, source=loss.logits_source)
        capture, collator = None, collate
    if len(train_ds) == 0:
        raise PipelineError("the cache's train split is empty")
    if cfg.data.eval_sequences is not None and cfg.data.eval_sequences < len(eval_ds):
        eval_ds = Subset(eval_ds, range(cfg.data.eval_sequences))  # the same first N at every evaluation
    if len(eval_ds) == 0 and args.eval_strategy != "no":
        raise PipelineError(f"training.eval_strategy is {args.eval_strategy.value} but the held-out split is empty "
                            "(data.heldout_fraction 0): set training.eval_strategy=no")
    hidden_norms = None
    if loss.gamma > 0 and loss.hidden in NEEDS_NORM:
        if online:
            hidden_norms = online_mean_square(capture, train_ds, cfg.cache.batch_size, teacher.width)
        else:
            hidden_norms = teacher.cache.hidden_mean_square(needed, progress=args.should_save)
    return _Data(train=train_ds, eval=eval_ds, collator=collator, capture=capture, hidden_norms=hidden_norms,
                 exact=exact)


def _exact_targets(online: bool, loss, teacher: _Teacher):
    """Exact targets' head and layer n: the cache's stored head (checked against its checksum), or the live
    teacher's own; None for other targets."""
    from pipeline.head import teacher_head
    from pipeline.train.trainer import ExactTargets

    if loss.logits_source != "exact" or loss.beta <= 0:
        return None
    if not online:
        return ExactTargets(teacher.cache.teacher_head(), teacher.cache.exact_layer)
    head, why = teacher_head(teacher.model)
    if head is None:
        raise PipelineError(f"loss.logits_source exact: the teacher's logits cannot be rebuilt from its last block "
                            f"output: {why}")
    return ExactTargets(head, teacher.n_layers)


def _online_datasets(cfg, loss, model, tokenizer, needed: list[int]):
    """Step 6, online: (train, held-out, capture, collator) from the data section's sequences, the targets
    captured from the live teacher batch by batch as cache.* would store them."""
    from pipeline.data.sequences import sequences_from_config
    from pipeline.teacher.capture import TeacherCapture
    from pipeline.train.dataset import OnlineTeacherCollator, SequenceDataset

    seqs = sequences_from_config(cfg.data, tokenizer)
    cc = cfg.cache
    train_ds = SequenceDataset(seqs.input_ids, seqs.lengths, range(0, seqs.n_train), cc.shard_sequences, cc.chunk_sequences)
    eval_ds = SequenceDataset(seqs.input_ids, seqs.lengths, range(seqs.n_train, len(seqs)), cc.shard_sequences, cc.chunk_sequences)
    sampled = loss.logits_source == "sampled"
    temps = sorted({float(loss.temperature), float(loss.proposal_temperature)} if sampled else {float(loss.temperature)})
    # exact targets read the captured layer n (in `needed`); top-1 only because the online collator always fills the
    # top-k batch keys, which the exact loss does not read
    topk = 0 if sampled else 1 if loss.logits_source == "exact" else cc.topk
    capture = TeacherCapture(model, needed, topk, temps, cc.logit_dtype,
                             samples=cc.samples if sampled else 0, proposal_temperature=cc.proposal_temperature,
                             sample_seed=cc.sample_seed)
    return train_ds, eval_ds, capture, OnlineTeacherCollator(capture, loss.temperature)


def _student_and_projectors(cfg, args, loss, student: _Student, teacher: _Teacher, layer_map: dict[int, int], echo):
    """Step 7: (student model, projectors, loss). The projectors are seeded (same run, same projectors); the loss
    falls back to the dense vocabulary path when this student cannot take the chunked one."""
    model = models.load_weights(student.spec, cfg.student.dtype, what="student")
    if loss.chunk_tokens:
        from pipeline.losses.chunked import chunk_support

        why = chunk_support(model)
        if why:
            echo(f"note: loss.chunk_tokens: {why}; the vocabulary losses take the dense path")
            loss = dataclasses.replace(loss, chunk_tokens=0)
    projectors = build_projectors(layer_map, student.config.hidden_size, teacher.width, cfg.mapping.projector,
                                  cfg.mapping.projector_init, seed=args.seed)
    return model, projectors, loss


def _train_loop(cfg, online: bool, args, resume: str | None, callbacks, loss, student: _Student, teacher: _Teacher,
                layer_map: dict[int, int], data: _Data, model, projectors, echo):
    """Step 8: (trainer, metrics). The held-out loss before training comes from eval_on_start: it runs after the
    Trainer has wrapped the student (DDP under several processes). A plain evaluate() before train() would make
    accelerate treat the bare student as prepared, and train() would then skip the DDP wrapper."""
    from pipeline.train.trainer import UniversalDistillationTrainer

    if len(data.eval) and resume is None:
        args.eval_on_start = True
    trainer = UniversalDistillationTrainer(
        model=model, args=args, train_dataset=data.train, eval_dataset=data.eval if len(data.eval) else None,
        data_collator=data.collator, callbacks=callbacks, projectors=projectors, layer_map=layer_map, loss=loss,
        projector_lr_multiplier=cfg.mapping.projector_lr_multiplier, hidden_norms=data.hidden_norms,
        exact=data.exact,
    )
    if args.should_save:
        echo(f"train ({'online' if online else 'cache'}): student {student.spec} "
             f"({student.config.num_hidden_layers} blocks) <- teacher {teacher.manifest['teacher']['model']} "
             f"({teacher.n_layers} blocks); map {layer_map}; "
             f"{len(data.train)} train / {len(data.eval)} held-out sequences")
    metrics: dict = {}
    # the step it resumes at, read now: with save_total_limit the Trainer deletes that checkpoint as it saves newer ones
    first_step = _checkpoint_step(resume) if resume else 0
    try:
        started = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=resume)
        metrics["train_seconds"] = time.perf_counter() - started  # steps and in-run evaluations, this process
        start = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e and e.get("step") == 0]
        if start:
            metrics["eval_loss_before"] = start[0]
        metrics["train_loss"] = result.training_loss
        metrics["global_step"] = result.global_step
        # the optimizer steps this process ran (all of them, unless it resumed): train_seconds covers only those
        metrics["steps_this_run"] = result.global_step - first_step
        if len(data.eval):
            metrics["eval_loss_after"] = trainer.evaluate()["eval_loss"]
    finally:
        trainer.remove_hooks()
        if data.capture is not None:
            data.capture.close()
    return trainer, metrics


def _checkpoint_step(checkpoint: str) -> int:
    """The global step a Trainer checkpoint was saved at."""
    from transformers.trainer_callback import TrainerState

    return int(TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json")).global_step)


def _summary(cfg, online: bool, resume: str | None, student: _Student, teacher: _Teacher, layer_map: dict[int, int],
             data: _Data, metrics: dict) -> dict:
    """Step 9: the run summary (run.json): the resolved config without credentials, the layer map, the metrics,
    this process's peak memory (rank 0's under DDP) and, from a cache, which cache it read."""
    config = cfg.to_dict()
    config["cache"]["storage_options"] = redact(cfg.cache.storage_options)
    summary = {
        "mode": "online" if online else "cache", "config": config, "student_source": student.spec,
        "layer_map": {str(j): t for j, t in layer_map.items()}, "metrics": metrics,
        "resumed_from": resume, "resources": peak_memory(),
    }
    if not online:
        manifest = teacher.manifest
        summary["cache"] = {"dir": cfg.cache.dir, "seq_len": manifest["seq_len"], "topk": manifest["topk"],
                            "fingerprint": manifest.get("fingerprint"),
                            "fingerprint_digest": manifest.get("fingerprint_digest")}
    if data.hidden_norms is not None:
        summary["hidden_mean_square"] = {str(t): v for t, v in data.hidden_norms.items()}
    return summary


def _write_run_dir(out: Path, online: bool, student: _Student, teacher: _Teacher, model, projectors, trainer,
                   summary: dict, echo) -> None:
    """Step 9 (rank 0): student/ swapped in whole (with a tokenizer: the student's, else the teacher's, and
    pruning.json), the projectors, the Trainer state and run.json."""
    out.mkdir(parents=True, exist_ok=True)
    tok = student.tokenizer
    if tok is None:
        tok = teacher.tokenizer if online else _teacher_tokenizer(teacher.manifest)

    def write_student(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
        if Path(student.spec, "pruning.json").is_file():
            shutil.copy2(Path(student.spec, "pruning.json"), tmp / "pruning.json")

    models.write_folder_atomically(out / "student", write_student)
    save_projectors(projectors, out, {"global_step": trainer.state.global_step, "mode": summary["mode"]})
    trainer.save_state()
    write_json_atomic(out / "run.json", summary)
    parts = ", ".join(f"{k} {v:.4f}" for k, v in summary["metrics"].items() if isinstance(v, float))
    echo(f"{out}: student/, projectors.*, trainer_state.json, run.json written ({parts})")


def _teacher_tokenizer(manifest: dict):
    """The cache's teacher tokenizer (no weights), for a student folder that has none; None if unavailable."""
    try:
        return models.load_tokenizer(manifest["teacher"]["model"])
    except Exception:  # noqa: BLE001 - the student folder is still valid without it
        return None
