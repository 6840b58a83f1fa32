"""Dynamics (FDD) loss vs a numpy float64 reference from its definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.losses.dynamics import DYNAMICS_LOSSES, dynamics_loss


def make_case(seed: int, layers: int = 4, n: int = 11, d: int = 16):
    """L x [N, d] student (projected) and teacher block outputs with depth-growing norms, a mixed mask [N]."""
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(n, d, generator=g) * (1 + 3 * i) for i in range(layers)]
    teacher = [torch.randn(n, d, generator=g) * (2 + 20 * i) + 1 for i in range(layers)]
    mask = torch.rand(n, generator=g) > 0.3
    mask[0] = True
    return student, teacher, mask


def numpy_fdd(student, teacher, mask) -> float:
    m = mask.numpy()
    s = [x.numpy().astype(np.float64)[m] for x in student]
    t = [x.numpy().astype(np.float64)[m] for x in teacher]
    pairs = []
    for a in range(len(s) - 1):
        ds, dt = s[a + 1] - s[a], t[a + 1] - t[a]
        cos = (ds * dt).sum(-1) / (np.linalg.norm(ds, axis=-1) * np.linalg.norm(dt, axis=-1))
        pairs.append((1 - cos).mean())
    return float(np.mean(pairs))


def test_registry_names():
    assert DYNAMICS_LOSSES.names() == ["fdd"]


@pytest.mark.parametrize("layers", [2, 3, 5])
def test_fdd_matches_numpy(layers):
    for seed in range(3):
        student, teacher, mask = make_case(seed, layers=layers)
        got = dynamics_loss("fdd", student, teacher, mask)
        assert got.dtype == torch.float32
        assert float(got) == pytest.approx(numpy_fdd(student, teacher, mask), rel=2e-6)


def test_fdd_compares_deltas_not_states():
    student, teacher, mask = make_case(3, layers=3)
    # the same steps from another starting point: every delta equals the teacher's -> 0
    shifted = [t + 100.0 * torch.ones_like(t) for t in teacher]
    assert float(dynamics_loss("fdd", shifted, teacher, mask)) == pytest.approx(0.0, abs=1e-6)
    # reversed steps: cos = -1 on every pair -> 2
    reversed_steps = [-t for t in teacher]
    assert float(dynamics_loss("fdd", reversed_steps, teacher, mask)) == pytest.approx(2.0, rel=1e-6)
    # order matters: only consecutive blocks in the given order are compared
    swapped = [student[1], student[0], student[2]]
    assert float(dynamics_loss("fdd", swapped, teacher, mask)) != pytest.approx(
        float(dynamics_loss("fdd", student, teacher, mask)), rel=1e-3)


def test_masked_rows_do_not_matter():
    student, teacher, mask = make_case(4)
    base = float(dynamics_loss("fdd", student, teacher, mask))
    s2 = [x.clone() for x in student]
    t2 = [x.clone() for x in teacher]
    for x in s2:
        x[~mask] = float("nan")
    for x in t2:
        x[~mask] = 1e30
    for x in s2:
        x.requires_grad_(True)
    got = dynamics_loss("fdd", s2, t2, mask)
    got.backward()
    assert float(got.detach()) == pytest.approx(base, rel=1e-6)
    for x in s2:
        assert torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all() and (x.grad[mask] != 0).any()


def test_all_false_mask_gives_zero():
    student, teacher, mask = make_case(5)
    for x in student:
        x.requires_grad_(True)
    got = dynamics_loss("fdd", student, teacher, torch.zeros_like(mask))
    got.backward()
    assert float(got.detach()) == 0.0 and all((x.grad == 0).all() for x in student)


def test_errors():
    student, teacher, mask = make_case(6)
    with pytest.raises(PipelineError, match="unknown dynamics loss 'fd'; valid: fdd"):
        dynamics_loss("fd", student, teacher, mask)
    with pytest.raises(PipelineError, match="at least 2 mapped blocks, got 1"):
        dynamics_loss("fdd", student[:1], teacher[:1], mask)
    with pytest.raises(ValueError):
        dynamics_loss("fdd", student, teacher[:3], mask)
