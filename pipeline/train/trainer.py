"""The one Trainer subclass: the compound distillation loss, projectors in the optimizer and checkpoints.

    L = alpha * CE(true next token) + beta * logits loss (T^2 included) + gamma * mean_j hidden(P_j(h_j), H_t(j))
      + delta * dynamics (FDD: mean over consecutive mapped blocks (a, b) of 1 - cos(P_b h_b - P_a h_a, H_t(b) - H_t(a)))

h_j is the output of student block j before the final norm (forward hooks, the cache's convention),
P_j its projector, H_t(j) the teacher's cached block output. CE and KL average over valid next-token
positions, the hidden and dynamics losses over valid tokens (the same positions for both).

The student is the Trainer's model (so the run's student folder stays a plain HF model); the
projectors live beside it: an extra optimizer param group (optional LR multiplier), gradients averaged
across processes before clipping, clipped together with the student's under one global norm (the
logged grad_norm covers both), zeroed with the student's after every optimizer step, skipped or not,
saved into every checkpoint, restored on resume and by load_best_model_at_end.
Loss components are summed as detached tensors and turned into floats only at logging steps. The whole
loss runs under the run's mixed precision. The Trainer's private methods are reached only through
trainer_adapter.py's hooks; everything else here is the Trainer's public surface.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from pipeline.errors import PipelineError
from pipeline import targets
from pipeline.head import final_hidden, head_spec
from pipeline.losses.chunked import EXACT_BUFFERS, VocabTerms, chunk_rows, chunked_head_loss, dense_vocab_loss
from pipeline.losses.dynamics import dynamics_loss
from pipeline.losses.hidden import COSINE_EPS, hidden_loss
from pipeline.losses.spec import LossSpec
from pipeline.student.projectors import INDEX_FILE, Projectors, load_projectors, save_projectors
from pipeline.blocks import decoder_layers, is_sharded
from pipeline.targets import TargetSource, hidden_key
from pipeline.train.dataset import ChunkShuffleSampler
from pipeline.train.fsdp import FsdpSettings, full_projectors, full_student_state
from pipeline.train.trainer_adapter import TrainerAdapter, last_whole_checkpoint

SHUFFLE_WINDOW = 2  # chunks whose rows are mixed together; the reader keeps the last 4 decoded chunks


def positions(input_ids: torch.Tensor, length: torch.Tensor | None
              ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """(attention mask [B, T] long, valid token rows [N'], valid next-token rows [M]) of a batch, rows as
    flat indices into [B * T]. Unpadded (no `length`): no attention mask, None for the token rows (every
    one is valid), and the next-token rows are built rather than searched for, so a step on a GPU does
    not wait for the device here."""
    B, T = input_ids.shape
    device = input_ids.device
    if length is None:
        starts = torch.arange(B, device=device)[:, None] * T
        return None, None, (starts + torch.arange(T - 1, device=device)[None, :]).reshape(-1)
    pos = torch.arange(T, device=device)[None, :]
    length = length.to(device)[:, None]
    valid = pos < length  # [B, T]
    rows = lambda m: m.reshape(-1).nonzero(as_tuple=True)[0]  # noqa: E731
    return valid.long(), rows(valid), rows(pos < length - 1)


def vocab_terms(spec: LossSpec, source: TargetSource, inputs: dict, rows: torch.Tensor, want_ce: bool) -> VocabTerms:
    """The vocabulary terms of a batch at its valid next-token positions `rows` [M] (flat indices into
    [B * T]): CE's targets (token t + 1; None unless `want_ce`) and, with beta > 0, the teacher targets of
    the run's `source`, as that kind's typed [M, ...] rows (pipeline/targets.py)."""
    ids = inputs["input_ids"]
    targets = torch.roll(ids, -1, dims=1).reshape(-1).index_select(0, rows) if want_ce else None
    teacher = source.batch(inputs, rows) if spec.beta > 0 else None
    return VocabTerms(alpha=spec.alpha, beta=spec.beta, targets=targets, divergence=spec.logits, tail=spec.tail,
                      args=spec.logits_args, temperature=spec.temperature, teacher=teacher)


class UniversalDistillationTrainer(TrainerAdapter):
    """The distillation Trainer: a Hugging Face `Trainer` whose model is the student, whose loss is the compound
    loss above (CE, the divergence on the teacher targets of `source`, the hidden-state and dynamics terms
    through the projectors), and whose optimizer, gradient clipping, checkpoints and evaluation carry the
    projectors with the student. The batches come from a cache (pipeline/train/dataset.py) or the live teacher's
    collator; the Trainer's own loop, schedulers, mixed precision and DDP run unchanged.

    `source` (pipeline/targets.py): the kind of teacher target the divergence reads, resolved against the teacher
    side; None reads top-k (or the kind `loss.logits_source` names). Exact targets carry the teacher's head."""

    def __init__(self, *args, projectors: Projectors, layer_map: dict[int, int], loss: LossSpec,
                 projector_lr_multiplier: float = 1.0, hidden_norms: dict[int, float] | None = None,
                 source: TargetSource | None = None, fsdp: FsdpSettings | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if source is None:
            named = loss.logits_source
            source = TargetSource(targets.TOPK if named == targets.AUTO else targets.kind(named))
        if loss.logits_source not in (targets.AUTO, source.name):
            raise ValueError(f"loss.logits_source {loss.logits_source} but the targets are {source.name}")
        exact = source.kind is targets.EXACT and loss.beta > 0
        if exact != (source.head is not None):
            raise ValueError("exact targets need loss.logits_source exact and the teacher's head, both or neither")
        self.source = source.with_head(source.head.to(self.args.device), source.layer) if exact else source
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:  # e.g. from an accelerate config file
            raise PipelineError("the projectors live beside the student: accelerate's DeepSpeed and FSDP plugins "
                                "are not supported (shard with training.fsdp=full_shard under torchrun)")
        self.fsdp = fsdp
        # a sharded run's projectors reach the device as they are sharded (or stay on the CPU, offloaded)
        self.projectors = projectors if fsdp is not None else projectors.to(self.args.device)
        self.layer_map = dict(sorted(layer_map.items()))
        self.loss_spec = loss.checked(self.source)
        self.projector_lr_multiplier = float(projector_lr_multiplier)
        self._student_hidden: dict[int, torch.Tensor] = {}
        self._hooks = []
        if self.loss_spec.needs_states:  # the hidden and the dynamics terms both read the mapped block outputs
            blocks = decoder_layers(self.model)
            for j in self.layer_map:
                self._hooks.append(blocks[j - 1].register_forward_hook(self._make_hook(j)))
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._eval_sums: dict[str, torch.Tensor] = {}
        self._projector_grads_synced = False
        self.hidden_norms = {int(t): float(v) for t, v in (hidden_norms or {}).items()}
        if self.loss_spec.gamma > 0 and self.loss_spec.hidden == "nmse":
            missing = sorted(set(self.layer_map.values()) - set(self.hidden_norms))
            if missing:
                raise PipelineError(f"loss.hidden nmse needs the teacher's mean square of layers {missing}")
        self.add_callback(_ProjectorSteps(self))
        # the chunked vocabulary loss (loss.chunk_tokens > 0; run_train has checked that the head is one we
        # reproduce): the student's forward stops at the final hidden states, captured here
        self._final_hidden: torch.Tensor | None = None
        self._chunk = 0
        if self.loss_spec.chunk_tokens:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            buffers = EXACT_BUFFERS if exact else 1
            self._chunk = chunk_rows(self.loss_spec.chunk_tokens, vocab, self.args.device, buffers=buffers)
            self._hooks.append(self.model.get_decoder().register_forward_hook(self._keep_final_hidden))
        self._projector_template = None
        self._sharded_checkpoint = None
        if fsdp is not None:  # pipeline/train/fsdp.py: sharded here, then prepared without DDP
            from pipeline.train import fsdp as sharding

            self._projector_template = copy.deepcopy(self.projectors).to("cpu")
            sharding.shard(self.model, self.projectors, fsdp, self.args.device)
            self.accelerator.prepare_model(self.model, device_placement=False, evaluation_mode=True)
            self._sharded_checkpoint = sharding.ShardedCheckpoint(self.model, self.projectors)
        self.held_bytes: dict[str, int] = {}
        self.add_callback(_HeldBytes(self))

    def _keep_final_hidden(self, module, args, output):
        self._final_hidden = final_hidden(output)

    def _make_hook(self, j: int):
        def hook(module, args, output):
            self._student_hidden[j] = output[0] if isinstance(output, (tuple, list)) else output  # [B, T, d_s]

        return hook

    # ------------------------------------------------------------------ loss
    def distill_loss(self, model, inputs: dict, cos_sums: dict[str, torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, its components). With `cos_sums`, also adds per mapped block j the sum over valid
        tokens of cos(P_j(h_j), H_t(j)) under "cos_L<j>" and the valid-token count under "tokens".

        Runs under the run's mixed precision (training.bf16 / fp16): accelerate applies it to the model's
        forward only, and the head matmuls of the chunked loss and the projectors run outside that forward,
        where a stock fine-tune runs its head inside it."""
        with self.accelerator.autocast():
            return self._distill_loss(model, inputs, cos_sums)

    def _distill_loss(self, model, inputs: dict, cos_sums: dict[str, torch.Tensor] | None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        spec = self.loss_spec
        ids = inputs["input_ids"]  # [B, T]
        attention, token_rows, rows = positions(ids, inputs.get("length"))
        self._student_hidden = {}
        B, T = ids.shape
        # CE is logged at evaluation always, in training only when it is part of the loss
        terms = vocab_terms(spec, self.source, inputs, rows, want_ce=spec.alpha > 0 or not model.training)
        if self._chunk:  # the forward stops at the final hidden states; the head runs chunk by chunk
            self._final_hidden = None
            model(input_ids=ids, attention_mask=attention, use_cache=False, logits_to_keep=1)
            h = self._final_hidden.reshape(B * T, -1).index_select(0, rows)  # [M, d]
            self._final_hidden = None
            head = head_spec(self.model)[0]
            if self.fsdp is not None and is_sharded(head.weight):  # the root unit resharded: shard() changed
                raise PipelineError("training.fsdp: the head's weight is sharded after the forward")
            total, parts = chunked_head_loss(h, head, terms, self._chunk)
        else:  # the dense reference: the model's full [N, V] logits
            logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
            total, parts = dense_vocab_loss(logits.reshape(B * T, -1).index_select(0, rows), terms)
        if spec.needs_states:  # the hidden and the dynamics loss, over the valid tokens
            students, teachers = [], []  # per mapped block j, increasing: P_j(h_j) [N', d_t], H_t(j) [N', d_t]
            for j, t in self.layer_map.items():
                h = self._student_hidden[j].reshape(B * T, -1)  # [N, d_s]
                teacher = inputs[hidden_key(t)].reshape(B * T, -1)
                if token_rows is not None:
                    h, teacher = h.index_select(0, token_rows), teacher.index_select(0, token_rows)
                with torch.profiler.record_function("distill/projectors"):
                    students.append(self.projectors[str(j)](h.float()))
                teachers.append(teacher)
                if cos_sums is not None:
                    cos = F.cosine_similarity(students[-1], teacher.float(), dim=-1, eps=COSINE_EPS)  # [N']
                    cos_sums[f"cos_L{j}"] = cos_sums.get(f"cos_L{j}", 0) + cos.detach().double().sum()
            if cos_sums is not None:
                cos_sums["tokens"] = cos_sums.get("tokens", 0) + float(students[0].shape[0])
        if spec.gamma > 0:
            per_layer = []
            for j, student, teacher in zip(self.layer_map, students, teachers):
                parts[f"loss_hidden_L{j}"] = value = hidden_loss(spec.hidden, student, teacher,
                                                                 norm=self.hidden_norms.get(self.layer_map[j]))
                per_layer.append(value)
            parts["loss_hidden"] = torch.stack(per_layer).mean()
            total = total + spec.gamma * parts["loss_hidden"]
        if spec.delta > 0:
            parts["loss_fdd"] = dynamics_loss(spec.dynamics, students, teachers)
            total = total + spec.delta * parts["loss_fdd"]
        self._student_hidden = {}
        return total, parts

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, parts = self.distill_loss(model, inputs)
        if model.training:
            for key, value in parts.items():
                v = value.detach()
                self._sums[key] = self._sums[key] + v if key in self._sums else v
            self._count += 1
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self.prepared_inputs(inputs)
        with torch.no_grad():
            loss, parts = self.distill_loss(model, inputs, cos_sums=self._eval_sums)
        # components weighted by batch size, as the Trainer weights eval_loss
        rows = inputs["input_ids"].shape[0]
        for key, value in parts.items():
            self._eval_sums[key] = self._eval_sums.get(key, 0) + value.detach().double() * rows
        self._eval_sums["rows"] = self._eval_sums.get("rows", 0) + torch.tensor(float(rows), dtype=torch.float64,
                                                                                 device=loss.device)
        return loss.detach(), None, None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        self._metric_prefix = metric_key_prefix  # the names evaluation_loop gives its extra metrics
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def evaluation_loop(self, *args, **kwargs):
        """The Trainer's loop, plus held-out means of every loss component (`eval_loss_ce`, ...) and the
        held-out cosine per mapped student block (`eval_cos_L<j>`, over all valid tokens)."""
        self._eval_sums = {}
        output = super().evaluation_loop(*args, **kwargs)
        if self.fsdp is not None:  # the root unit keeps what its no-grad forwards gathered: free it
            self.model.reshard()
        prefix = getattr(self, "_metric_prefix", "eval")
        sums, self._eval_sums = self._eval_sums, {}
        if sums:
            keys = sorted(sums)
            device = sums["rows"].device
            totals = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=device) for k in keys])
            if self.accelerator.num_processes > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")
            total = dict(zip(keys, totals.tolist()))
            for key, value in total.items():
                if key.startswith("loss_"):
                    output.metrics[f"{prefix}_{key}"] = value / total["rows"]
                elif key.startswith("cos_L") and total.get("tokens"):
                    output.metrics[f"{prefix}_{key}"] = value / total["tokens"]
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._count:
            keys = list(self._sums)
            means = torch.stack([self._sums[k] for k in keys]) / self._count  # one host sync per log
            if self.accelerator.num_processes > 1:
                means = self.accelerator.reduce(means, reduction="mean")
            for key, value in zip(keys, means.tolist()):
                logs[key] = value
            self._sums, self._count = {}, 0
        super().log(logs, start_time)

    # ------------------------------------------------------------------ data
    def train_sampler(self, dataset):
        groups = getattr(dataset, "groups", None)  # cache chunks: shuffled whole, rows within a small window
        return None if groups is None else ChunkShuffleSampler(groups, seed=self.args.seed, window=SHUFFLE_WINDOW)

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        params = [p for p in self.projectors.parameters() if p.requires_grad]
        if fresh and params:
            optimizer.add_param_group({
                "params": params, "weight_decay": self.args.weight_decay,
                "lr": self.args.learning_rate * self.projector_lr_multiplier,
            })
            # in case neither norm hook below ran (they always do inside the Trainer's loop)
            optimizer.register_step_pre_hook(lambda *_: self._sync_projector_grads())
        return optimizer

    def _sync_projector_grads(self) -> None:
        """Average the projectors' gradients across processes, once per optimizer step: they are outside
        the DDP wrapper, and the global norm must see the averaged values."""
        if self._projector_grads_synced:
            return
        self._projector_grads_synced = True
        if self.fsdp is not None:  # FSDP units: their gradients are reduce-scattered (averaged) already
            return
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        if world > 1:
            for p in self.projectors.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(world)

    def before_grad_norm(self) -> None:
        self._sync_projector_grads()

    def clipped_parameters(self, model):
        """The student's and the projectors' parameters: one global norm, clipped together."""
        return [*model.parameters(), *self.projectors.parameters()]

    def _zero_projector_grads(self) -> None:
        self.projectors.zero_grad(set_to_none=True)
        self._projector_grads_synced = False

    # ------------------------------------------------------------------ checkpoints
    def sharded_checkpoint(self):
        return self._sharded_checkpoint

    def checkpoint_saved(self, output_dir: str) -> None:
        if self.args.should_save and self.fsdp is None:  # the projectors go with every checkpoint (sharded: in
            # the student's shards)
            save_projectors(self.projectors, output_dir, {"global_step": self.state.global_step})

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """The Trainer's train(); a resumed run first restores the checkpoint's projectors (the Trainer
        restores the student, the optimizer, which holds the projectors' group, and the data position).
        `True` resumes from the newest whole checkpoint (one whose save did not finish is passed over)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_whole_checkpoint(self.args.output_dir)[0]
        if resume_from_checkpoint and self.fsdp is None:  # sharded: restored with the student's shards
            self._restore_projectors(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _restore_projectors(self, checkpoint: str) -> None:
        if not os.path.isfile(os.path.join(checkpoint, INDEX_FILE)):
            raise PipelineError(f"checkpoint {checkpoint} has no {INDEX_FILE}: cannot restore the projectors")
        saved = load_projectors(checkpoint)
        if set(saved.keys()) != set(self.projectors.keys()) or saved.kinds() != self.projectors.kinds():
            raise PipelineError(
                f"checkpoint {checkpoint} has projectors for layers {sorted(saved.keys())}, "
                f"this run maps {sorted(self.projectors.keys())}"
            )
        with torch.no_grad():
            for key, module in self.projectors.items():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(saved[key].weight.to(module.weight.device, module.weight.dtype))

    def gathered_for_save(self):
        """(the student's state dict or None, the projectors) to write the run directory from: under FSDP the whole
        tensors gathered onto rank 0's CPU (every rank must call this), else None (the model's own) and the
        projectors themselves."""
        if self.fsdp is None:
            return None, self.projectors
        return full_student_state(self.model), full_projectors(self.projectors, self._projector_template)

    def sharding(self) -> dict | None:
        """Under FSDP, what this process holds: {"processes", "student_local_fraction", "projectors_local_fraction",
        "dtensor_parameters", "parameters", "reshard_after_forward", "offload", "shard_devices"} (the fractions of the
        elements held locally; the device types the local shards live on, ["cpu"] when offloaded); None unsharded."""
        if self.fsdp is None:
            return None
        params = [*self.model.parameters(), *self.projectors.parameters()]
        def frac(ps):
            held = sum(p.to_local().numel() if is_sharded(p) else p.numel() for p in ps)
            return held / max(1, sum(p.numel() for p in ps))

        return {"processes": torch.distributed.get_world_size(), "parameters": len(params),
                "dtensor_parameters": sum(is_sharded(p) for p in params),
                "student_local_fraction": frac(list(self.model.parameters())),
                "projectors_local_fraction": frac(list(self.projectors.parameters())),
                "reshard_after_forward": self.fsdp.reshard_after_forward, "offload": self.fsdp.offload,
                "shard_devices": sorted({(p.to_local() if is_sharded(p) else p).device.type for p in params})}

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


class _ProjectorSteps(TrainerCallback):
    """The projectors' share of the Trainer's step events.

    After every optimizer step, taken or skipped (fp16 loss scaling skips a step on inf/nan), the Trainer
    zeroes the student's gradients; the projectors' are zeroed at the same moment, so none survive into the
    next step. At the end of training with load_best_model_at_end, the Trainer has loaded the best
    checkpoint's student; its projectors are restored here."""

    def __init__(self, trainer: UniversalDistillationTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._zero_projector_grads()

    def on_train_end(self, args, state, control, **kwargs):
        if args.load_best_model_at_end and state.best_model_checkpoint is not None and self.trainer.fsdp is None:
            self.trainer._restore_projectors(state.best_model_checkpoint)


class _HeldBytes(TrainerCallback):
    """The training state this process holds, at its largest: after each optimizer step, while the gradients
    are still there, the bytes of the student's and the projectors' parameters, their gradients and the
    optimizer's state (a sharded run's local shards only). Read into `trainer.held_bytes`."""

    def __init__(self, trainer: UniversalDistillationTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        from pipeline.train.fsdp import local_bytes

        trainer = self.trainer
        params = [*trainer.model.parameters(), *trainer.projectors.parameters()]
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        states = [v for per in optimizer.state.values() for v in per.values() if torch.is_tensor(v) and v.dim()]
        now = {"parameters": local_bytes(params), "gradients": local_bytes(p.grad for p in params),
               "optimizer": local_bytes(states)}
        now["total"] = sum(now.values())
        if now["total"] > trainer.held_bytes.get("total", -1):
            trainer.held_bytes = now
