"""Feature-dynamics losses over consecutive mapped layers (docs/architecture.md, section 12, "Feature dynamics").

A hidden loss matches each mapped block to its teacher layer on its own; a dynamics loss matches how the
representation *changes* from one mapped block to the next (chapter 6.4.2), so a student that reaches
the right states by a different route between them still pays. `fdd` (Feature Dynamics Distillation):
over consecutive mapped student blocks (a, b) in increasing order,

    L_fdd = mean over pairs of mean over valid tokens of 1 - cos(P_b(h_s[b]) - P_a(h_s[a]), H_t[t(b)] - H_t[t(a)])

with h_s block outputs before the final norm, P the projectors (applied by the caller) and H_t the
teacher's block outputs. Each registered loss takes the valid rows only, one [M, d] fp32 tensor per mapped
block for each side, in increasing block order, and returns a scalar.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError
from pipeline.losses.hidden import COSINE_EPS
from pipeline.registry import Registry

DynamicsLoss = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], torch.Tensor]  # L x [M, d] each -> scalar

DYNAMICS_LOSSES: Registry[DynamicsLoss] = Registry("dynamics loss")

MIN_LAYERS = 2  # a dynamics loss compares consecutive mapped blocks: it needs at least one pair


@DYNAMICS_LOSSES.register("fdd")
def fdd_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """mean over consecutive pairs (a, b) of mean over rows of 1 - cos(s_b - s_a, t_b - t_a)."""
    per_pair = []
    for a in range(len(student) - 1):
        ds = student[a + 1] - student[a]  # [M, d] the student's step from block a to block b (projected)
        dt = teacher[a + 1] - teacher[a]  # [M, d] the teacher's step between the mapped layers
        per_pair.append((1.0 - F.cosine_similarity(ds, dt, dim=-1, eps=COSINE_EPS)).mean())
    return torch.stack(per_pair).mean()


def dynamics_loss(name: str, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Loss `name` over L mapped blocks in increasing order: student and teacher L x [N, d], mask [N] bool
    (None: every row, selected by the caller; no search for the rows, so no host sync on a GPU).

    Masked-out rows are never read into the computation; an all-False mask gives 0 (attached to the graph).
    Fewer than MIN_LAYERS blocks -> PipelineError (there is no pair to compare).
    """
    with torch.profiler.record_function("distill/dynamics_loss"):
        loss = DYNAMICS_LOSSES.get(name)
        if len(student) != len(teacher):
            raise ValueError(f"{len(student)} student blocks but {len(teacher)} teacher layers")
        if len(student) < MIN_LAYERS:
            raise PipelineError(f"dynamics loss {name} needs at least {MIN_LAYERS} mapped blocks, got {len(student)}")
        for s, t in zip(student, teacher):
            if s.dim() != 2 or s.shape != t.shape or s.shape != student[0].shape:
                raise ValueError(f"every block must be [N, d] on both sides, got {tuple(s.shape)} and {tuple(t.shape)}")
        if mask is not None:
            if mask.shape != student[0].shape[:1]:
                raise ValueError(f"mask {tuple(mask.shape)} must be [N] = [{student[0].shape[0]}]")
            rows = mask.to(torch.bool).nonzero(as_tuple=True)[0]  # [M]
            student = [x.index_select(0, rows) for x in student]
            teacher = [x.index_select(0, rows) for x in teacher]
        s = [x.float() for x in student]  # L x [M, d]
        if s[0].shape[0] == 0:
            return sum(x.sum() for x in s)
        return loss(s, [x.float() for x in teacher])
