"""Sparse Logit Sampling (Anshumann et al., ACL 2025): K draws per position from the teacher's distribution.

Per position, K ids are drawn with replacement from p_Tp = softmax(z / Tp) (Tp = the proposal temperature)
and reduced to their distinct ids, how often each was drawn (counts summing to K) and the teacher's raw
logits there. With the cached lse, p_T(i) = exp(z_i / T - lse_T) is exact at every drawn id, and

    w_i = (c_i / K) * p_T(i) / p_Tp(i)        (= c_i / K when T = Tp)

has E[w_i] = p_T(i) for every id of the vocabulary, so sum_i w_i f(i) is an unbiased estimate of the
full-vocabulary E_{p_T}[f] (pipeline/losses/sampled.py).

The draws are inverse-CDF lookups of uniforms that depend only on (seed, sequence index): sequence i takes
the [T, K] uniforms of numpy's generator seeded with [seed, i]. So the bytes of a cache do not depend on
the capture batch size, the LM-head chunking or a resume, and an online teacher that knows the sequence
indices draws exactly what the cache holds.
"""

from __future__ import annotations

import numpy as np
import torch


def sequence_uniforms(seed: int, sequences: list[int], seq_len: int, samples: int) -> np.ndarray:
    """[len(sequences), seq_len, samples] float32 uniforms in [0, 1), one fixed stream per sequence index."""
    out = np.empty((len(sequences), seq_len, samples), dtype=np.float32)
    for r, i in enumerate(sequences):
        out[r] = np.random.default_rng([int(seed), int(i)]).random((seq_len, samples), dtype=np.float32)
    return out


def draw(z: torch.Tensor, uniforms: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draws from softmax(z / temperature) per row, reduced to distinct ids.

    z [c, V] fp32 raw logits, uniforms [c, K] in [0, 1). Returns (ids [c, K] long, counts [c, K] int32,
    logits [c, K] fp32): the distinct drawn ids sorted by logit (descending) with their counts and z there;
    the slots after the last distinct id repeat it with count 0 (an empty slot; constant runs compress well).
    """
    c, K = uniforms.shape
    # unnormalised CDF of exp((z - max) / T): the uniforms scale to its last value, so the fp32 rounding of
    # the sum shifts no mass to an out-of-range id
    e = torch.sub(z, z.amax(dim=-1, keepdim=True))  # [c, V]
    if temperature != 1.0:  # (dividing by 1 is exact: the same draws either way)
        e.div_(temperature)
    cdf = e.exp_().cumsum_(dim=-1)
    total = cdf[:, -1:]
    # u * total rounds below total (the product can round up to it), so the lookup stays on an id of mass > 0
    target = torch.minimum(uniforms.to(cdf.device, torch.float32) * total, torch.nextafter(total, torch.zeros_like(total)))
    drawn = torch.searchsorted(cdf, target, right=True)  # [c, K]: the first id whose cdf exceeds the target
    del cdf
    return distinct_draws(drawn, z.gather(-1, drawn))


def distinct_draws(drawn: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-draw ids [c, K] and their logits -> (ids [c, K] long, counts [c, K] int32, logits [c, K] fp32) as
    `draw` returns them: the distinct ids sorted by logit (descending; equal logits by id), their
    counts, the logits there, the slots after the last distinct id repeating it with count 0. The last step
    of `draw` and of the vocabulary-parallel draw (pipeline/teacher/vocab_parallel.py), which has no full row."""
    c, K = drawn.shape
    srt, order = drawn.sort(dim=-1)
    at = logits.gather(-1, order)
    first = torch.ones_like(srt, dtype=torch.bool)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    slot = first.long().cumsum(dim=-1) - 1  # [c, K] index of the run each draw belongs to
    counts = torch.zeros(c, K, dtype=torch.int32, device=drawn.device).scatter_add_(
        -1, slot, torch.ones_like(slot, dtype=torch.int32))
    ids = torch.zeros(c, K, dtype=torch.long, device=drawn.device).scatter_(-1, slot, srt)
    # every draw of a run carries the same id, hence the same logit: the scatter's duplicates agree
    vals = torch.zeros(c, K, dtype=torch.float32, device=drawn.device).scatter_(-1, slot, at)
    vals.masked_fill_(counts == 0, -torch.inf)
    vals, order = vals.sort(dim=-1, descending=True, stable=True)
    ids, counts = ids.gather(-1, order), counts.gather(-1, order)
    n = (counts > 0).sum(dim=-1, keepdim=True)  # [c, 1] distinct ids, >= 1
    last = torch.minimum(torch.arange(K, device=drawn.device)[None, :], n - 1)
    return ids.gather(-1, last), counts, vals.gather(-1, last)


class SampleBuffers:
    """The draws of one capture call, filled chunk by chunk from inside the LM-head loop."""

    def __init__(self, uniforms: torch.Tensor, temperature: float):
        self.uniforms, self.temperature = uniforms, float(temperature)  # [N, K] on the head's device
        n, k = uniforms.shape
        self.ids = torch.empty(n, k, dtype=torch.long, device=uniforms.device)
        self.counts = torch.empty(n, k, dtype=torch.int32, device=uniforms.device)
        self.logits = torch.empty(n, k, dtype=torch.float32, device=uniforms.device)

    def __call__(self, z: torch.Tensor, start: int) -> None:
        """Rows [start, start + len(z)) from their [c, V] fp32 logits."""
        end = start + len(z)
        self.ids[start:end], self.counts[start:end], self.logits[start:end] = draw(
            z, self.uniforms[start:end], self.temperature)
