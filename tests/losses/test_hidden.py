"""Hidden losses vs numpy float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.losses.hidden import HIDDEN_LOSSES, hidden_loss


def make_case(seed: int, n: int = 9, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, d, generator=g) * 2
    teacher = torch.randn(n, d, generator=g) * 50 + 3  # deep-layer-like scale
    mask = torch.rand(n, generator=g) > 0.3
    mask[0] = True
    return student, teacher, mask


NORM = 2509.0  # a teacher layer's mean square (50^2 + 3^2), given as the cache's constant, not taken from the batch


def numpy_reference(name: str, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> float:
    s = student.numpy().astype(np.float64)[mask.numpy()]
    t = teacher.numpy().astype(np.float64)[mask.numpy()]
    if name == "cosine":
        cos = (s * t).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
        return float((1 - cos).mean())
    mse = float(((s - t) ** 2).mean())
    if name == "mse":
        return mse
    if name == "nmse":
        return mse / NORM
    raise AssertionError(name)


NAMES = ["cosine", "mse", "nmse"]


def test_registry_names():
    assert HIDDEN_LOSSES.names() == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_matches_numpy(name):
    for seed in range(3):
        student, teacher, mask = make_case(seed)
        got = hidden_loss(name, student, teacher, mask, norm=NORM)
        assert got.dtype == torch.float32
        assert float(got.detach()) == pytest.approx(numpy_reference(name, student, teacher, mask), rel=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_masked_rows_do_not_matter(name):
    student, teacher, mask = make_case(4)
    base = float(hidden_loss(name, student, teacher, mask, norm=NORM))
    student2, teacher2 = student.clone(), teacher.clone()
    student2[~mask] = float("nan")
    teacher2[~mask] = 1e30
    student2.requires_grad_(True)
    got = hidden_loss(name, student2, teacher2, mask, norm=NORM)
    got.backward()
    assert float(got.detach()) == pytest.approx(base, rel=1e-6)
    assert torch.isfinite(student2.grad).all() and (student2.grad[~mask] == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_all_false_mask_gives_zero(name):
    student, teacher, mask = make_case(5)
    student.requires_grad_(True)
    got = hidden_loss(name, student, teacher, torch.zeros_like(mask), norm=NORM)
    got.backward()
    assert float(got.detach()) == 0.0 and (student.grad == 0).all()


def test_nmse_invariant_to_common_scale():
    student, teacher, mask = make_case(6)
    base = float(hidden_loss("nmse", student, teacher, mask, norm=NORM))
    for c in (1e-3, 7.0, 1e3):  # a layer c times larger has a mean square c^2 times larger
        assert float(hidden_loss("nmse", student * c, teacher * c, mask, norm=NORM * c * c)) == pytest.approx(base, rel=1e-5)
    # plain mse is not: it scales with c^2
    assert float(hidden_loss("mse", student * 10, teacher * 10, mask)) == pytest.approx(
        100 * float(hidden_loss("mse", student, teacher, mask)), rel=1e-5
    )


def test_nmse_denominator_does_not_depend_on_the_batch():
    """A huge BOS-like row in the batch changes nmse only by its own error term, not the scale of the rest."""
    student, teacher, mask = make_case(10)
    mask[:] = True
    base = float(hidden_loss("nmse", student, teacher, mask, norm=NORM))
    n = len(mask)
    s2, t2 = torch.cat([student, torch.zeros(1, student.shape[1])]), torch.cat([teacher, torch.zeros(1, teacher.shape[1])])
    s2[-1], t2[-1] = 100.0, 100.0  # a row far larger than the rest, matched exactly: zero error
    got = float(hidden_loss("nmse", s2, t2, torch.ones(n + 1, dtype=torch.bool), norm=NORM))
    assert got == pytest.approx(base * n / (n + 1), rel=1e-6)  # one more row of zero error in the mean, nothing else


def test_nmse_requires_its_constant():
    student, teacher, mask = make_case(11)
    for norm in (None, 0.0, float("nan")):
        with pytest.raises(ValueError, match="mean square"):
            hidden_loss("nmse", student, teacher, mask, norm=norm)


def test_cosine_ignores_positive_scale_and_is_zero_on_equal():
    student, teacher, mask = make_case(7)
    assert float(hidden_loss("cosine", teacher * 3, teacher, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(hidden_loss("cosine", -teacher, teacher, mask)) == pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_low_precision_inputs_computed_in_fp32(name):
    student, teacher, mask = make_case(8)
    s16, t16 = student.bfloat16(), teacher.half()
    got = hidden_loss(name, s16, t16, mask, norm=NORM)
    assert got.dtype == torch.float32
    assert float(got.detach()) == pytest.approx(numpy_reference(name, s16.float(), t16.float(), mask), rel=1e-5)


def test_errors():
    student, teacher, mask = make_case(9)
    with pytest.raises(PipelineError, match="cosine, mse, nmse"):
        hidden_loss("l1", student, teacher, mask)
    with pytest.raises(ValueError):
        hidden_loss("mse", student, teacher[:, :4], mask)
