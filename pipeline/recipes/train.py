"""Phase two: train the student and its projectors from the cache alone (or, with online=True, from the
live teacher, for parity checks).

`run_train` reads as its numbered steps, each a private function below it in the same order: training
arguments, the student's shape (config only), the teacher side and the targets the loss reads, the layer map,
the compatibility checks, the datasets, the student and projectors, the Trainer loop, then the run directory:
    student/                 plain HF folder (+ the student's tokenizer, + pruning.json when there is one)
    projectors.safetensors   projectors.json
    trainer_state.json       run.json (resolved config, cache fingerprint, layer map, metrics)
    checkpoint-N/            Trainer checkpoints, each with its projectors

A checkpoint counts once whole (pipeline/train/trainer_adapter.py, `checkpoint_problem`): `--resume` takes the
newest whole one and names in one line any newer one it passes over. A full disk while saving a checkpoint or the
run directory is a one-line error that removes the unfinished checkpoint and keeps the previous student/.

The teacher side (pipeline/train/teacher_side.py) is a cache or the live teacher behind one interface: the
recipe picks it in step 3 and branches nowhere else.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
import typing
from pathlib import Path

import click

from pipeline import targets
from pipeline.atomic import write_file_atomically, write_folder_atomically, write_json_atomic
from pipeline.blocks import text_config
from pipeline.cache.storage import redact
from pipeline.errors import PipelineError
from pipeline.losses.hidden import NEEDS_NORM
from pipeline.resources import free_bytes, no_space_left, peak_memory, size_text
from pipeline.sources import models
from pipeline.sources.digest import tokenizer_digest
from pipeline.student.layer_map import build_layer_map, read_kept_layers
from pipeline.student.projectors import build_projectors, save_projectors
from pipeline.train import checks
from pipeline.train.arguments import training_arguments
from pipeline.train.fsdp import fsdp_settings, init_process_group, take_over_accelerate_fsdp
from pipeline.train.teacher_side import open_teacher


def run_train(cfg, online: bool = False, resume: str | None = None, callbacks=None, echo=None) -> dict:
    """Train; returns the run summary written to run.json (only rank 0 writes files)."""
    echo = echo or (lambda msg: click.echo(msg, err=True))

    # 1. training arguments (validated before anything heavy), FSDP, the checkpoint to resume from
    fsdp = fsdp_settings(cfg.training)
    take_over_accelerate_fsdp()
    init_process_group(fsdp)
    args = training_arguments(cfg.training, online=online, sharded=fsdp is not None)
    resume = _resume_checkpoint(resume, Path(args.output_dir), echo if args.should_save else None)

    # 2. the student's shape, from its config only
    student = _student_shape(cfg.student)

    # 3. the teacher side: the cache (its manifest; no teacher weights) or the live teacher (its config; the
    # weights load in step 4); the teacher targets the loss reads there, and the loss checked against them
    teacher = open_teacher(cfg, online)
    source = teacher.facts.source(cfg.loss.logits_source)
    loss = dataclasses.replace(cfg.loss, logits_source=source.name).checked(source)
    if args.should_save:
        echo(f"loss: {loss.describe(source)}")

    try:
        # 4. the layer map; the live teacher's weights load only now that the map is known to be valid
        layer_map = _layer_map(cfg.mapping, loss, student, teacher.facts)
        teacher.load(args.device)

        # 5. compatibility checks, before step one
        _check_compatibility(cfg, args, loss, student, teacher, layer_map, echo)

        # 6. datasets and their collator, the nmse constants, the exact targets' head
        data = _datasets(cfg, args, loss, source, teacher, layer_map)

        # 7. the student and one projector per mapped pair
        model, projectors, loss = _student_and_projectors(cfg, args, loss, student, teacher, layer_map, echo)

        # 8. the loop
        trainer, metrics = _train_loop(cfg, args, resume, callbacks, loss, student, teacher, layer_map, data,
                                       model, projectors, echo, fsdp)
    finally:
        teacher.close()

    # 9. the run directory (rank 0): student folder swapped in whole, projectors, state, run.json
    summary = _summary(cfg, resume, student, teacher, layer_map, data, metrics)
    summary["resources"]["held_bytes"] = trainer.held_bytes  # this process's (rank 0's) training state
    if fsdp is not None:
        summary["fsdp"] = trainer.sharding()
    state, projectors = trainer.gathered_for_save()  # every rank: a sharded run gathers onto rank 0 here
    if args.should_save:
        out = Path(args.output_dir)
        try:
            _write_run_dir(out, student, teacher, model, projectors, trainer, summary, echo, state)
        except Exception as e:
            if isinstance(e, PipelineError) or not no_space_left(e, out):
                raise
            raise _out_of_space(out, trainer, outputs=True) from None
    return summary


@dataclasses.dataclass(frozen=True)
class _Student:
    """The student before its weights load: its source, text config, kept blocks and tokenizer (if any)."""

    spec: str
    config: typing.Any
    kept: list[int] | None
    tokenizer: typing.Any


@dataclasses.dataclass(frozen=True)
class _Data:
    """What the loop reads: the splits, the collator, the nmse constants and the resolved teacher targets
    (with the teacher's head for exact targets)."""

    train: typing.Any
    eval: typing.Any
    collator: typing.Any
    source: targets.TargetSource
    hidden_norms: dict[int, float] | None = None


def _resume_checkpoint(resume: str | None, out: Path, echo=None) -> str | None:
    """Step 1: --resume ("latest": the newest whole checkpoint-* in the output folder) -> a checkpoint folder, or
    None. Newer checkpoints whose save did not finish (a kill or a full disk mid-save) are passed over, named
    with the reason in one line through `echo`; they stay until the resumed run saves over them. A named
    checkpoint that is not whole is a one-line error."""
    from pipeline.train.trainer_adapter import checkpoint_problem, last_whole_checkpoint

    if resume == "latest":
        resume, skipped = last_whole_checkpoint(out)
        passed = "; ".join(f"{path} ({why})" for path, why in skipped)
        if resume is None and skipped:
            raise PipelineError(f"--resume: no whole checkpoint in {out}: {passed}")
        if resume is None:
            raise PipelineError(f"--resume: no checkpoint-* folder in {out}")
        if skipped and echo is not None:
            echo(f"--resume: skipping {passed}; resuming from {resume}")
    elif resume is not None and not Path(resume).is_dir():
        raise PipelineError(f"--resume: checkpoint folder not found: {resume}")
    elif resume is not None and checkpoint_problem(resume) is not None:
        raise PipelineError(f"--resume: {resume} is not a whole checkpoint ({checkpoint_problem(resume)}); "
                            "--resume alone takes the newest whole one")
    return resume


def _student_shape(student) -> _Student:
    """Step 2: cfg.student -> its depth, width and vocab (config only), pruning.json's kept blocks, tokenizer."""
    if student.model is None:
        raise PipelineError("student.model is not set: name the pruned student's HF folder")
    spec = student.model
    return _Student(spec=spec, config=text_config(models.load_config(spec)),
                    kept=read_kept_layers(spec) if Path(spec).is_dir() else None,
                    tokenizer=models.load_tokenizer(spec) if models.has_tokenizer(spec) else None)


def _layer_map(mapping, loss, student: _Student, facts) -> dict[int, int]:
    """Step 4: student block -> teacher layer; student depth from its config, teacher depth from the teacher
    side's facts, kept blocks from pruning.json."""
    layer_map = build_layer_map(mapping.strategy, student.config.num_hidden_layers, facts.num_layers, mapping.stride,
                                student.kept)
    checks.check_dynamics_map(loss, layer_map)
    return layer_map


def _check_compatibility(cfg, args, loss, student: _Student, teacher, layer_map: dict[int, int], echo) -> None:
    """Step 5: the compatibility checks, before step one (one-line errors). From a cache, the sequence length
    (like every other data property) is the manifest's: the YAML's data section describes how that cache was
    built, so a differing data.seq_len is only noted."""
    facts = teacher.facts
    checks.check_all(
        facts=facts, student_vocab=student.config.vocab_size,
        student_tokenizer_digest=tokenizer_digest(student.tokenizer) if student.tokenizer is not None else None,
        layer_map=layer_map, loss=loss, student_positions=getattr(student.config, "max_position_embeddings", None),
    )
    if int(cfg.data.seq_len) != int(facts.seq_len) and args.should_save:
        echo(f"note: data.seq_len {cfg.data.seq_len} is not used; the cache holds {facts.seq_len}-token sequences")


def _datasets(cfg, args, loss, source: targets.TargetSource, teacher, layer_map: dict[int, int]) -> _Data:
    """Step 6: the train and held-out splits with only what the loss reads, their collator, for nmse one
    constant per teacher layer from the train split, and for exact targets the teacher's head."""
    from torch.utils.data import Subset

    needed = sorted(set(layer_map.values())) if loss.needs_states else []
    if source.kind is targets.EXACT and loss.beta > 0:
        source = source.with_head(*teacher.exact_head())
    train_ds, eval_ds, collator = teacher.datasets(cfg, loss, source, needed)
    if len(train_ds) == 0:
        raise PipelineError("the cache's train split is empty")
    if cfg.data.eval_sequences is not None and cfg.data.eval_sequences < len(eval_ds):
        eval_ds = Subset(eval_ds, range(cfg.data.eval_sequences))  # the same first N at every evaluation
    if len(eval_ds) == 0 and args.eval_strategy != "no":
        raise PipelineError(f"training.eval_strategy is {args.eval_strategy.value} but the held-out split is empty "
                            "(data.heldout_fraction 0): set training.eval_strategy=no")
    hidden_norms = None
    if loss.gamma > 0 and loss.hidden in NEEDS_NORM:
        hidden_norms = teacher.hidden_norms(needed, train_ds, progress=args.should_save)
    return _Data(train=train_ds, eval=eval_ds, collator=collator, source=source, hidden_norms=hidden_norms)


def _student_and_projectors(cfg, args, loss, student: _Student, teacher, layer_map: dict[int, int], echo):
    """Step 7: (student model, projectors, loss). The projectors are seeded (same run, same projectors); the loss
    falls back to the dense vocabulary path when this student cannot take the chunked one."""
    model = models.load_weights(student.spec, cfg.student.dtype, what="student")
    if loss.chunk_tokens:
        from pipeline.losses.chunked import chunk_support

        why = chunk_support(model)
        if why:
            echo(f"note: loss.chunk_tokens: {why}; the vocabulary losses take the dense path")
            loss = dataclasses.replace(loss, chunk_tokens=0)
    projectors = build_projectors(layer_map, student.config.hidden_size, teacher.facts.hidden_size, cfg.mapping.projector,
                                  cfg.mapping.projector_init, seed=args.seed)
    return model, projectors, loss


def _train_loop(cfg, args, resume: str | None, callbacks, loss, student: _Student, teacher, layer_map: dict[int, int],
                data: _Data, model, projectors, echo, fsdp=None):
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
        source=data.source, fsdp=fsdp,
    )
    if args.should_save:
        echo(f"train ({'online' if teacher.online else 'cache'}): student {student.spec} "
             f"({student.config.num_hidden_layers} blocks) <- teacher {teacher.facts.model} "
             f"({teacher.facts.num_layers} blocks); map {layer_map}; "
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
    except Exception as e:
        if isinstance(e, PipelineError) or not no_space_left(e, args.output_dir):
            raise
        raise _out_of_space(Path(args.output_dir), trainer) from None
    finally:
        trainer.remove_hooks()
    return trainer, metrics


def _checkpoint_step(checkpoint: str) -> int:
    """The global step a Trainer checkpoint was saved at."""
    from transformers.trainer_callback import TrainerState

    return int(TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json")).global_step)


def _summary(cfg, resume: str | None, student: _Student, teacher, layer_map: dict[int, int], data: _Data,
             metrics: dict) -> dict:
    """Step 9: the run summary (run.json): the resolved config without credentials, the layer map, the metrics,
    this process's peak memory (rank 0's under DDP) and, from a cache, which cache it read."""
    config = cfg.to_dict()
    config["cache"]["storage_options"] = redact(cfg.cache.storage_options)
    summary = {
        "mode": "online" if teacher.online else "cache", "config": config, "student_source": student.spec,
        "layer_map": {str(j): t for j, t in layer_map.items()}, "metrics": metrics,
        "resumed_from": resume, "resources": peak_memory(),
    }
    if teacher.record() is not None:
        summary["cache"] = teacher.record()
    if data.hidden_norms is not None:
        summary["hidden_mean_square"] = {str(t): v for t, v in data.hidden_norms.items()}
    return summary


def _write_run_dir(out: Path, student: _Student, teacher, model, projectors, trainer, summary: dict, echo,
                   state: dict | None = None) -> None:
    """Step 9 (rank 0): student/ swapped in whole (with a tokenizer: the student's, else the teacher's, and
    pruning.json), the projectors, the Trainer state and run.json. `state`: the student's whole weights when
    the model holds only shards (FSDP)."""
    out.mkdir(parents=True, exist_ok=True)
    tok = student.tokenizer if student.tokenizer is not None else teacher.tokenizer()

    def write_student(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=state)
        if tok is not None:
            tok.save_pretrained(tmp)
        if Path(student.spec, "pruning.json").is_file():
            shutil.copy2(Path(student.spec, "pruning.json"), tmp / "pruning.json")

    write_folder_atomically(out / "student", write_student)
    save_projectors(projectors, out, {"global_step": trainer.state.global_step, "mode": summary["mode"]})
    write_file_atomically(out / "trainer_state.json", lambda tmp: trainer.state.save_to_json(str(tmp)))
    write_json_atomic(out / "run.json", summary)
    parts = ", ".join(f"{k} {v:.4f}" for k, v in summary["metrics"].items() if isinstance(v, float))
    echo(f"{out}: student/, projectors.*, trainer_state.json, run.json written ({parts})")


def _out_of_space(out: Path, trainer, outputs: bool = False) -> PipelineError:
    """The one line a full disk ends a run with, while it saved a checkpoint or (`outputs`) the run directory:
    what was being written and what it takes, what is free, and where a rerun with --resume starts. Rank 0
    first removes the checkpoints whose save it cut short. student/ needs nothing here: write_folder_atomically
    has kept the previous one and left no student.tmp."""
    from pipeline.train.trainer_adapter import checkpoint_problem, checkpoints, last_whole_checkpoint

    cut = []
    if trainer.args.should_save:
        for path in checkpoints(out):
            if checkpoint_problem(path) is not None:
                shutil.rmtree(path, ignore_errors=True)
                cut.append(Path(path).name)
    last, _ = last_whole_checkpoint(out)
    if outputs:
        doing = "writing the run's outputs (student/ is replaced only whole, the previous one stays until then)"
        size = f"student/ and the projectors take about {size_text(_tensor_bytes(trainer, optimizer=False))}"
    else:
        doing = f"saving {cut[0]} (removed)" if cut else "saving a checkpoint"
        checkpoint = _folder_bytes(Path(last)) if last is not None else _tensor_bytes(trainer, optimizer=True)
        size = f"a checkpoint takes about {size_text(checkpoint)}"
    free = free_bytes(out)
    room = size + (f", {size_text(free)} free" if free is not None else "")
    again = (f"rerun with --resume to continue from {last}" if last is not None
             else "rerun (no whole checkpoint to resume from)")
    return PipelineError(f"training.output_dir {out}: no space left on device while {doing}: {room}; free space "
                         f"and {again}")


def _folder_bytes(folder: Path) -> int:
    """The bytes a folder's files take on disk (allocated blocks)."""
    return sum(f.stat().st_blocks * 512 for f in folder.rglob("*") if f.is_file())


def _tensor_bytes(trainer, optimizer: bool) -> int:
    """About what the student's weights and the projectors take, and with `optimizer` a whole checkpoint: those
    and the optimizer's state."""
    import torch

    tensors = [*trainer.model.state_dict().values(), *trainer.projectors.parameters()]
    if optimizer and trainer.optimizer is not None:
        tensors += [v for state in trainer.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)
