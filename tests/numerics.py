"""Rounding-error bounds for fp32 computations checked against float64 references.

A tolerance in a numerical test is the error that fp32 rounding can produce in the computation under test,
derived from the operations it performs; it does not depend on which CPU, vector width, summation order or
math library runs them. The model (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., ch. 2-4):

- a basic operation (+, -, *, /, sqrt) is correctly rounded: fl(x op y) = (x op y)(1 + d), |d| <= U = 2^-24;
- exp, log, expm1, log1p, pow, tanh come from a vector math library accurate to 1 ulp: relative error
  <= LIB = 2U (SLEEF's u10 functions, which PyTorch's CPU kernels use, and glibc are within that);
- a sum of n terms, in any order or blocking (serial, pairwise, SIMD lanes, threads), is off by at most
  gamma(n - 1) * sum |terms|, and a dot product of length n by gamma(n) * sum |products|, with
  gamma(n) = n U / (1 - n U) (Higham, Lemma 3.1 and eq. 3.5; the bound holds for every summation tree).

An error already present in an input is carried to the output by the derivative (the condition number);
the bounds are first order in U: terms in U^2 (below 1e-9 relative here) are dropped. The bounds are
deterministic and computed from the float64 reference values of the case at hand, so a case whose result is
a small difference of large terms (a KL between close distributions) gets the larger bound it needs, and a
well-conditioned one keeps a tight bound.
"""

from __future__ import annotations

import torch

U = 2.0**-24  # fp32 unit roundoff
LIB = 2 * U  # a 1-ulp library function (exp, log, expm1, log1p, pow, tanh)


def gamma(n: float) -> float:
    """gamma_n = n U / (1 - n U): the relative error bound of n chained roundings (n terms of a dot product)."""
    assert n * U < 1, n
    return n * U / (1 - n * U)


def dot_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bound on |fl(a @ b) - a @ b| elementwise for exact fp32 inputs: gamma(n) |a| @ |b|, n the inner size."""
    return gamma(a.shape[-1]) * (a.double().abs() @ b.double().abs())


def sum_error(terms: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Bound on the rounding of fl(sum(terms, dim)) of exact terms: gamma(n - 1) sum |terms|."""
    return gamma(max(terms.shape[dim] - 1, 0)) * terms.double().abs().sum(dim)


def assert_within(what: str, got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> float:
    """|got - ref| <= bound elementwise; returns the largest error / bound (how much of the bound was used)."""
    got, ref = torch.as_tensor(got).double(), torch.as_tensor(ref).double()
    err = (got - ref).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(err)
    ratio = (err / bound).max().item()
    assert (err <= bound).all(), f"{what}: |got - ref| / bound = {ratio:.3g} (max error {err.max().item():.3g})"
    return ratio
