"""Hidden-state losses for one mapped layer pair (docs/architecture.md, section 12, "Hidden losses").

Each registered loss takes the valid rows only, student [M, d] (already projected to the teacher width)
and teacher [M, d], both fp32, plus the layer's normaliser `norm` (None unless the loss needs one), and
returns a scalar averaged over those rows. The caller averages over layer pairs. Hidden norms grow ~100x
with depth, hence `cosine` and `nmse` besides plain `mse`.

`nmse` divides by one constant per teacher layer: the teacher's mean square of that block's output over
the cache's train split (valid tokens, all features), stored in the manifest at build time. A per-batch
denominator would let the few huge BOS rows (|h| ~100x the rest) set the scale of every other token.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.registry import Registry

HiddenLoss = Callable[[torch.Tensor, torch.Tensor, "float | None"], torch.Tensor]  # ([M, d], [M, d], norm) -> scalar

HIDDEN_LOSSES: Registry[HiddenLoss] = Registry("hidden loss")

# cosine: guards a zero vector (padding that slipped through, a dead projector)
COSINE_EPS = 1e-8
NEEDS_NORM = ("nmse",)


@HIDDEN_LOSSES.register("cosine")
def cosine_loss(student: torch.Tensor, teacher: torch.Tensor, norm: float | None = None) -> torch.Tensor:
    """mean over rows of 1 - cos(student_r, teacher_r) along the feature dim."""
    return (1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=COSINE_EPS)).mean()


@HIDDEN_LOSSES.register("mse")
def mse_loss(student: torch.Tensor, teacher: torch.Tensor, norm: float | None = None) -> torch.Tensor:
    """mean over rows and features of (student - teacher)^2."""
    return (student - teacher).square().mean()


@HIDDEN_LOSSES.register("nmse")
def nmse_loss(student: torch.Tensor, teacher: torch.Tensor, norm: float | None = None) -> torch.Tensor:
    """mse / norm, norm the teacher layer's mean square over the train split: scale-free across depths."""
    if norm is None or not norm > 0:
        raise ValueError(f"nmse needs the teacher layer's mean square (> 0), got {norm}")
    return mse_loss(student, teacher) / norm


def hidden_loss(name: str, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None,
                norm: float | None = None) -> torch.Tensor:
    """Loss `name` between student [N, d] and teacher [N, d] over rows where mask [N] is True (fp32 scalar);
    mask None: every row (the caller selected them; no search for the rows, so no host sync on a GPU).
    `norm` is the layer's normaliser for the losses in NEEDS_NORM.

    Masked-out rows are never read into the computation; an all-False mask gives 0 (attached to the graph).
    """
    with torch.profiler.record_function("distill/hidden_loss"):
        loss = HIDDEN_LOSSES.get(name)
        if student.dim() != 2 or student.shape != teacher.shape:
            raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must both be [N, d]")
        if mask is None:
            return loss(student.float(), teacher.float(), norm) if student.shape[0] else student.float().sum()
        if mask.shape != student.shape[:1]:
            raise ValueError(f"mask {tuple(mask.shape)} must be [N] = [{student.shape[0]}]")
        rows = mask.to(torch.bool).nonzero(as_tuple=True)[0]  # [M]
        return hidden_loss(name, student.index_select(0, rows), teacher.index_select(0, rows), None, norm)
