"""Where a training step's time goes, read from torch.profiler's labelled ranges.

The phases and the labels that mark them:

    batch read          torch's own `enumerate(DataLoader)#...__next__` (cache read + decode + collate; online:
                        the teacher's forward in the collator)
    student forward     `bench/student_forward`: a forward pre-hook and hook on the student model (set here)
    head + vocab losses `bench/output_embedding` (a hook on the output embedding: the dense path's and the
                        fine-tune's head matmul run inside the forward), the vocabulary losses' own labels
                        (`distill/chunked_head_loss`, `distill/dense_vocab_loss`, `distill/logits_loss`,
                        `distill/cross_entropy`, `distill/sampled_logits_loss`, `distill/exact_logits_loss`:
                        pipeline/losses/) and torch's `aten::cross_entropy_loss` (the stock model's own CE).
                        The chunked loss computes the head's gradients here, in its forward.
    hidden + projectors `distill/projectors` (pipeline/train/trainer.py), `distill/hidden_loss`,
                        `distill/dynamics_loss` (pipeline/losses/)
    backward            the autograd engine's `autograd::engine::evaluate_function: ...` ranges outside every
                        other label (a backward run inside a loss's forward stays that loss's)
    optimizer           torch's own `Optimizer.step#...`
    rest                the step's wall time minus the phases above (clipping, zero_grad, scheduler, callbacks,
                        moving the batch, masks, ...)

Phases are exclusive: each profiled range's own time (its span minus its children's) goes to the innermost
label around it, so the phases and rest sum to the step. On CUDA the phases are the GPU's kernel time under
their labels (the batch read: the host's time), rest the remainder of the step's wall time.

The profiler records every op of the timed steps, and every child of a breakdown run alike: about 4,500 ranges
per step of the --student-vocab runs on this CPU, at ~2 µs each ~10 ms of a 2-4 s step. `label_seconds` gives
each label's inclusive time per step (torch.profiler's key_averages), which the JSON lines keep as `labels`.
"""

from __future__ import annotations

PHASES = ("batch", "forward", "head", "hidden", "backward", "optimizer", "rest")
PHASE_NAMES = {"batch": "batch read", "forward": "student forward", "head": "head + vocab losses",
               "hidden": "hidden + projectors", "backward": "backward", "optimizer": "optimizer", "rest": "rest"}
STUDENT_FORWARD, OUTPUT_EMBEDDING = "bench/student_forward", "bench/output_embedding"
LABELS = {
    STUDENT_FORWARD: "forward",
    OUTPUT_EMBEDDING: "head",
    "distill/chunked_head_loss": "head", "distill/dense_vocab_loss": "head", "distill/logits_loss": "head",
    "distill/cross_entropy": "head", "distill/sampled_logits_loss": "head", "distill/exact_logits_loss": "head",
    "aten::cross_entropy_loss": "head",
    "distill/projectors": "hidden", "distill/hidden_loss": "hidden", "distill/dynamics_loss": "hidden",
}
PREFIXES = {"enumerate(DataLoader)#": "batch", "Optimizer.step#": "optimizer"}
BACKWARD_PREFIX = "autograd::engine::evaluate_function:"


def phase_of(name: str, enclosing: str | None) -> str | None:
    """The phase a range named `name` charges its own time to, inside a range of phase `enclosing`."""
    if name in LABELS:
        return LABELS[name]
    for prefix, phase in PREFIXES.items():
        if name.startswith(prefix):
            return phase
    if name.startswith(BACKWARD_PREFIX) and enclosing is None:
        return "backward"
    return enclosing


def label_module(module, label: str) -> None:
    """A profiler range named `label` around every forward of `module` (its pre-hook opens it, its hook closes it)."""
    import torch

    open_ranges = []

    def enter(*_):
        r = torch.profiler.record_function(label)
        r.__enter__()
        open_ranges.append(r)

    def leave(*_):
        if open_ranges:
            open_ranges.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)


class PhaseProfile:
    """torch.profiler over the timed steps of one training run; `label_student` marks the student's forward
    and its output embedding, `breakdown` turns the ranges into seconds per phase and step."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=activities)

    def label_student(self, model) -> None:
        label_module(model, STUDENT_FORWARD)
        if model.get_output_embeddings() is not None:
            label_module(model.get_output_embeddings(), OUTPUT_EMBEDDING)

    def start(self) -> None:
        self.prof.start()

    def stop(self) -> None:
        self.prof.stop()

    def _own_seconds(self, event, phase: str) -> float:
        if self.cuda and phase != "batch":
            return event.self_device_time_total / 1e6
        return event.self_cpu_time_total / 1e6

    def breakdown(self, step_seconds: list[float]) -> dict[str, float]:
        """Mean seconds per step of each phase over the profiled steps (whose wall times are `step_seconds`);
        rest is what the others leave of the mean step."""
        from torch.autograd import DeviceType

        totals = dict.fromkeys(PHASES, 0.0)

        def walk(event, enclosing: str | None) -> None:
            phase = phase_of(event.name, enclosing)
            if phase is not None:
                totals[phase] += self._own_seconds(event, phase)
            for child in event.cpu_children:
                walk(child, phase)

        for event in self.prof.events():
            if event.cpu_parent is None and event.device_type == DeviceType.CPU:
                walk(event, None)
        n = len(step_seconds)
        out = {p: totals[p] / n for p in PHASES if p != "rest"}
        out["rest"] = sum(step_seconds) / n - sum(out.values())
        return {p: out[p] for p in PHASES}

    def label_seconds(self, steps: int) -> dict[str, float]:
        """Mean seconds per step inside each label (inclusive of what runs within it), from key_averages."""
        attr = "device_time_total" if self.cuda else "cpu_time_total"
        return {a.key: getattr(a, attr) / 1e6 / steps for a in self.prof.key_averages()
                if a.key in LABELS or a.key.startswith(tuple(PREFIXES))}
