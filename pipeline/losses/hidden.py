"""Hidden-state losses for one mapped layer pair (DESIGN.md section 3, "Hidden losses").

Each registered loss takes the valid rows only, student [M, d] (already projected to the teacher width)
and teacher [M, d], both fp32, and returns a scalar averaged over those rows. The caller averages over
layer pairs. Hidden norms grow ~100x with depth, hence `cosine` and `nmse` besides plain `mse`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.registry import Registry

HiddenLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # ([M, d], [M, d]) -> scalar

HIDDEN_LOSSES: Registry[HiddenLoss] = Registry("hidden loss")

# cosine: guards a zero vector (padding that slipped through, a dead projector); nmse: an all-zero teacher.
COSINE_EPS = 1e-8
NMSE_EPS = 1e-12


@HIDDEN_LOSSES.register("cosine")
def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """mean over rows of 1 - cos(student_r, teacher_r) along the feature dim."""
    return (1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=COSINE_EPS)).mean()


@HIDDEN_LOSSES.register("mse")
def mse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """mean over rows and features of (student - teacher)^2."""
    return (student - teacher).square().mean()


@HIDDEN_LOSSES.register("nmse")
def nmse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """mse / mean(teacher^2) over these rows and features: scale-free across depths."""
    return mse_loss(student, teacher) / teacher.square().mean().clamp(min=NMSE_EPS)


def hidden_loss(name: str, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Loss `name` between student [N, d] and teacher [N, d] over rows where mask [N] is True (fp32 scalar).

    Masked-out rows are never read into the computation; an all-False mask gives 0 (attached to the graph).
    """
    loss = HIDDEN_LOSSES.get(name)
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must both be [N, d]")
    if mask.shape != student.shape[:1]:
        raise ValueError(f"mask {tuple(mask.shape)} must be [N] = [{student.shape[0]}]")
    rows = mask.to(torch.bool).nonzero(as_tuple=True)[0]  # [M]
    s = student.index_select(0, rows).float()  # [M, d]
    if rows.numel() == 0:
        return s.sum()
    t = teacher.index_select(0, rows).float()  # [M, d]
    return loss(s, t)
