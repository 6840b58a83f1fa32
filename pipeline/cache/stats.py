"""Per-layer statistics of the teacher's hidden states, gathered while the cache is written.

`hidden_mean_square` (manifest, train split): for each cached layer, the mean over valid tokens and
features of the captured (fp32, before encoding) block output squared. The `nmse` hidden loss divides by
it: one constant per layer, the same for every batch.
"""

from __future__ import annotations

import numpy as np


def square_sums(h: np.ndarray) -> np.ndarray:
    """Each token's sum over features of h^2: [r, T, d] -> [r, T] float64."""
    return np.einsum("rtd,rtd->rt", h, h, dtype=np.float64)


def token_squares(hidden: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """{layer: square_sums(h)} for hidden {layer: [r, T, d]}."""
    return {int(layer): square_sums(h) for layer, h in hidden.items()}


class SquareSums:
    """Running per-layer sums of squares and the valid-token count; `mean_square(d)` -> {layer: mean}."""

    def __init__(self) -> None:
        self.sums: dict[int, float] = {}
        self.tokens = 0

    def add(self, hidden: dict[int, np.ndarray], valid: np.ndarray) -> None:
        self.add_token_squares(token_squares(hidden), valid)

    def add_token_squares(self, squares: dict[int, np.ndarray], valid: np.ndarray) -> None:
        """The same from each token's sum of squares {layer: [r, T] float64} (token_squares, or computed
        where the teacher ran)."""
        for layer, per_token in squares.items():
            self.sums[int(layer)] = self.sums.get(int(layer), 0.0) + float(per_token[valid].sum())
        self.tokens += int(valid.sum())

    def mean_square(self, hidden_size: int) -> dict[int, float]:
        if not self.tokens:
            return {}
        return {layer: value / (self.tokens * hidden_size) for layer, value in sorted(self.sums.items())}
