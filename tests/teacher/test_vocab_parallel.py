"""The vocabulary-parallel head (pipeline/teacher/vocab_parallel.py) against the unsharded capture functions.

Every split runs with all its ranks in this process (InProcess); the last test runs two ranks under torchrun
(gloo) and compares their results with the in-process ones bit for bit. The references are torch.topk,
capture.tail_sums, capture.stored_lse (finish_lse) and sampling.draw on the full rows.

Tolerances come from the rounding of the operations (tests/numerics.py: U = 2^-24, gamma(n) = n U / (1 - n U),
first order in U), never from measured errors.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.teacher.capture import stored_lse, tail_sums
from pipeline.teacher.sampling import draw, sequence_uniforms
from pipeline.teacher.vocab_parallel import (
    InProcess,
    VocabSplit,
    merge_topk,
    parallel_draw,
    parallel_head,
    parallel_lookup,
    parallel_max,
    parallel_stored_lse,
    parallel_tail_sums,
    parallel_topk,
)
from tests.numerics import LIB, U, gamma

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "vocab_parallel_worker.py"
TEMPS = [1.0, 2.0, 0.7]  # 0.7: not a power of two, so (z - max) / T rounds
SEQS, SEQ_LEN, DRAWS = 3, 16, 32  # 48 positions (rows), K = 32 draws each
ROWS = SEQS * SEQ_LEN
# (name, split, k): uneven chunked splits (DTensor's rule), a hand split whose first shard is smaller than k,
# k above every shard's size, an empty last shard, and k = V (no tail at all)
CASES = [
    ("301/2", VocabSplit.chunked(301, 2), 16),
    ("301/3", VocabSplit.chunked(301, 3), 16),
    ("301/5+155+141", VocabSplit(301, ((0, 5), (5, 160), (160, 301))), 16),
    ("10/4 k>shard", VocabSplit.chunked(10, 4), 5),
    ("9/4 empty", VocabSplit.chunked(9, 4), 4),
    ("5/4 k=V", VocabSplit.chunked(5, 4), 5),
]
KINDS = ["random", "tied", "masked"]
NEAR_EXCEEDED = 1e-6  # the chance, over the data, that a seeded draw test sees more near-CDF targets than allowed


def _logits(kind: str, vocab: int, seed: int) -> torch.Tensor:
    """[ROWS, vocab] fp32: from flat rows to very confident ones (tails from ~1 down to ~1e-12). "tied":
    values on a grid of 1/2, so most logits tie with others, at the top-k boundary too. "masked": the random
    rows with all but 1% to 15% of the ids (and at least the largest) at -inf, as a head that masks ids
    gives them: on V = 301 from fewer finite logits than k (-inf ids enter the top-k beside the shards'
    pads) to a finite tail."""
    g = torch.Generator().manual_seed(seed)
    if kind == "tied":
        return torch.randint(0, 8, (ROWS, vocab), generator=g).float() / 2
    z = torch.randn(ROWS, vocab, generator=g) * 2 + torch.linspace(-5, 25, ROWS)[:, None]
    z[torch.arange(ROWS), torch.randint(0, vocab, (ROWS,), generator=g)] += torch.linspace(0, 30, ROWS)
    if kind == "masked":
        keep = torch.rand(ROWS, vocab, generator=g) < torch.linspace(0.01, 0.15, ROWS)[:, None]
        keep[torch.arange(ROWS), z.argmax(-1)] = True
        z = z.masked_fill(~keep, float("-inf"))
    return z


def _shards(z: torch.Tensor, split: VocabSplit) -> list[torch.Tensor]:
    return [split.shard(z, r) for r in range(split.world)]


def _uniforms(seed: int) -> torch.Tensor:
    return torch.from_numpy(sequence_uniforms(seed, list(range(SEQS)), SEQ_LEN, DRAWS)).reshape(ROWS, DRAWS)


def _ulp32(x: torch.Tensor) -> torch.Tensor:
    """Spacing of fp32 floats at |x| (float64): 2^(e - 24) for 2^(e-1) <= |x| < 2^e."""
    x = x.double().abs()
    _, e = torch.frexp(x)
    return torch.where(x > 0, torch.ldexp(torch.ones_like(x), e - 24).clamp_min(2.0 ** -149), 2.0 ** -149)


def _assert_within(what: str, got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> float:
    err = (got.double() - ref.double()).abs()
    bound = bound.expand_as(err)
    ratio = (err / bound.clamp_min(1e-300)).max().item()
    assert (err <= bound).all(), f"{what}: |got - ref| / bound = {ratio:.3g} (max error {err.max().item():.3g})"
    return ratio


def _sum_height(split: VocabSplit) -> int:
    """Additions a term goes through in the sharded sum: at most (largest shard - 1) in its rank's sum, then
    N - 1 in the rank-ordered sum of the partial sums."""
    return max(e - s for s, e in split.bounds) - 1 + split.world - 1


def count_tie_differences(z: torch.Tensor, ref_ids: torch.Tensor, ids: torch.Tensor) -> int:
    """The positions (row, slot) whose top-k id differs from torch.topk's only because two logits tie: fails if
    an id differs where the logits at the two ids do not tie; returns how many differ."""
    diff = ref_ids != ids
    if diff.any():
        rows, slots = diff.nonzero(as_tuple=True)
        a, b = z[rows, ref_ids[rows, slots]], z[rows, ids[rows, slots]]
        assert torch.equal(a, b), f"top-k ids differ where the logits do not tie: {a[a != b][:4]} vs {b[a != b][:4]}"
    return int(diff.sum())


def _check_merged_order(z: torch.Tensor, top: torch.Tensor, ids: torch.Tensor) -> None:
    """A top-k of z in merge_topk's order: distinct real ids, z there equal to the values, sorted by (value
    descending, id ascending), and no id left out above the k-th value."""
    assert ids.min() >= 0 and ids.max() < z.shape[-1]
    assert (ids.sort(-1).values.diff(dim=-1) > 0).all(), "an id appears twice"
    assert torch.equal(z.gather(-1, ids), top)
    a, b = top[:, :-1], top[:, 1:]  # compared, not subtracted: -inf - -inf is nan
    assert ((b < a) | ((b == a) & (ids.diff(dim=-1) > 0))).all(), "not ordered by (value descending, id ascending)"
    rest = z.scatter(-1, ids, float("-inf"))
    assert (rest.amax(-1) <= top[:, -1]).all()


def _binomial_quantile(n: int, p: float, eps: float) -> int:
    """The smallest m with P(Binomial(n, p) > m) <= eps."""
    if p >= 1:
        return n
    cdf = 0.0
    for m in range(n + 1):
        cdf += math.exp(math.lgamma(n + 1) - math.lgamma(m + 1) - math.lgamma(n - m + 1)
                        + m * math.log(p) + (n - m) * math.log1p(-p)) if p > 0 else float(m == 0)
        if 1 - cdf <= eps:
            return m
    return n


def test_split_and_preconditions():
    # DTensor Shard(0) splits like torch.chunk; the ranks torch.chunk has no chunk for get an empty shard
    for vocab, world in [(301, 2), (301, 3), (10, 4), (9, 4), (5, 4), (8, 8), (7, 8)]:
        sizes = [e - s for s, e in VocabSplit.chunked(vocab, world).bounds]
        chunks = [len(c) for c in torch.arange(vocab).chunk(world)]
        assert sizes == chunks + [0] * (world - len(chunks)), (vocab, world)
    for bounds in [((0, 5), (6, 10)), ((0, 5), (5, 9)), ((5, 10), (0, 5)), ((0, 6), (6, 5), (5, 10))]:
        with pytest.raises(ValueError):
            VocabSplit(10, bounds)
    split = VocabSplit.chunked(10, 2)
    z = torch.randn(3, 10)
    with pytest.raises(ValueError):
        parallel_topk(InProcess(2), split, _shards(z, split), 11)  # k > V
    with pytest.raises(ValueError):
        parallel_topk(InProcess(2), split, _shards(z, split), 0)
    with pytest.raises(ValueError):
        parallel_topk(InProcess(3), split, _shards(z, split), 2)  # a split for another group size
    with pytest.raises(ValueError):
        parallel_topk(InProcess(2), split, [z[:, :4], z[:, 4:]], 2)  # shards that are not the split's


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name,split,k", CASES, ids=[c[0] for c in CASES])
def test_topk(name, split, k, kind):
    """The merged top-k values are torch.topk's on the full row; its ids differ only where logits tie."""
    z = _logits(kind, split.vocab, seed=1)
    top, ids = parallel_topk(InProcess(split.world), split, _shards(z, split), k)
    ref_top, ref_ids = torch.topk(z, k, dim=-1)
    assert torch.equal(top, ref_top)
    ties = count_tie_differences(z, ref_ids, ids)
    _check_merged_order(z, top, ids)
    if kind == "random":
        assert ties == 0  # fp32 normal logits: no two of a row's top k + 1 are equal (measured 0)
    elif kind == "tied" and split.vocab > k:
        assert ties > 0  # the helper did meet ties
    # the merge is a function of its inputs: the gathered top-k in another rank order gives the same result
    local = [torch.topk(s, min(k, s.shape[-1]), dim=-1) for s in _shards(z, split)]
    perm = torch.randperm(split.world, generator=torch.Generator().manual_seed(0)).tolist()
    pad = [(torch.cat([v, v.new_full((ROWS, k - v.shape[-1]), float("-inf"))], -1),
            torch.cat([i + split.bounds[r][0], i.new_full((ROWS, k - i.shape[-1]), split.vocab)], -1))
           for r, (v, i) in enumerate(local)]
    v2, i2 = merge_topk(torch.stack([pad[r][0] for r in perm]), torch.stack([pad[r][1] for r in perm]), k)
    assert torch.equal(v2, top) and torch.equal(i2, ids)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name,split,k", CASES, ids=[c[0] for c in CASES])
def test_tail_sums_and_stored_lse(name, split, k, kind):
    """S_out,T and the stored lse over the shards against capture.tail_sums / stored_lse on the full row.

    Both sums add the same fp32 terms exp((z - max z) / T): the top value 0 is the same number, and the
    masking, subtraction, division and exp are the same elementwise fp32 operations. Only the order of the
    additions differs, so each is within gamma(h) * sum(terms) of the exact sum of those terms (h: the
    additions a term goes through; V - 1 unsharded, _sum_height sharded), and they differ by at most the sum
    of the two. finish_lse is the same float64 function of S_out: log1p(S_out / S_in) moves by at most
    |dS| / (S_in + min S_out), and each result is rounded once to fp32 (0.5 ulp each), after float64 steps
    whose rounding is a few 2^-53 of the magnitudes (lse, log V). With tau = S_out / (S_in + S_out) the lse
    bound is ulp(lse) + (gamma(V - 1) + gamma(h)) tau: a rounding plus a few hundred 2^-24 tau at most.
    """
    z = _logits(kind, split.vocab, seed=2)
    comm, V = InProcess(split.world), split.vocab
    top, ids = parallel_topk(comm, split, _shards(z, split), k)
    ref_top, ref_ids = torch.topk(z, k, dim=-1)
    sums = parallel_tail_sums(comm, split, _shards(z, split), top[:, :1], ids, TEMPS)
    ref_sums = tail_sums(z.clone(), ref_top, ref_ids, TEMPS)
    stored = top.half().float()  # the cache's default logit dtype
    lse = parallel_stored_lse(comm, split, _shards(z, split), top, ids, stored, TEMPS)
    ref_lse = stored_lse(z.clone(), ref_top, ref_ids, stored, TEMPS)
    rel = gamma(V - 1) + gamma(_sum_height(split))
    for ti, t in enumerate(TEMPS):
        # the exact sum of the fp32 terms, as tail_sums forms them
        masked = z.scatter(-1, ref_ids, float("-inf")).sub_(ref_top[:, :1])
        terms = (masked if t == 1.0 else masked / t).exp().double().sum(-1)
        s_bound = rel * terms
        _assert_within(f"S_out at T={t}", sums[ti], ref_sums[ti], s_bound)
        top64 = top.double()
        s_in = torch.exp(top64 / t - top64[:, :1] / t).sum(-1)
        low = torch.minimum(sums[ti], ref_sums[ti]).double()
        mag = torch.maximum(lse[ti].abs(), ref_lse[ti].abs()).double()
        bound = _ulp32(mag) + s_bound / (s_in + low) + 2.0 ** -50 * (mag + math.log(V))
        _assert_within(f"stored lse at T={t}", lse[ti], ref_lse[ti], bound)


@pytest.mark.parametrize("name,split", [(c[0], c[1]) for c in CASES[:3]] + [("301/1", VocabSplit.chunked(301, 1))])
def test_full_vocabulary_lse(name, split):
    """Without a top-k (sampled targets only) the stored lse is log S_T + max / T over the whole vocabulary,
    against logsumexp(z / T) in float64. Each term exp(x_i), x_i = (z_i - max) / T, is computed with a relative
    error <= 2U |x_i| + LIB (the subtraction and division round x_i, exp is a 1-ulp function), the sum adds
    gamma(h); log adds LIB |log S|, max / T and the final addition half an ulp each."""
    z = _logits("random", split.vocab, seed=3)
    lse = parallel_stored_lse(InProcess(split.world), split, _shards(z, split), None, None, None, TEMPS)
    for ti, t in enumerate(TEMPS):
        x = (z.double() - z.double().amax(-1, keepdim=True)) / t
        p = torch.softmax(x, -1)
        s = x.exp().sum(-1)
        ref = torch.logsumexp(z.double() / t, -1)
        eta = (p * (2 * U * x.abs() + LIB)).sum(-1) + gamma(_sum_height(split))
        gt = z.double().amax(-1) / t
        bound = eta + LIB * s.log().abs() + 0.5 * _ulp32(gt) * (t != 1.0) + 0.5 * _ulp32(ref)
        _assert_within(f"full-vocabulary lse at T={t}", lse[ti], ref, bound)


def _reference_lookup(z: torch.Tensor, u: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sampling.draw's lookup on the full row, step for step -> (each draw's id, the fp32 terms, the CDF)."""
    e = torch.sub(z, z.amax(dim=-1, keepdim=True))
    if t != 1.0:
        e.div_(t)
    terms = e.exp_()
    cdf = terms.cumsum(dim=-1)
    total = cdf[:, -1:]
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True), terms, cdf


def _near_cdf_value(terms: torch.Tensor, u: torch.Tensor, world: int) -> torch.Tensor:
    """[c, K]: the draws whose exact target u S lies within W of an exact CDF value C_j (the prefix sums of
    the fp32 terms, S = C_{V-1}), where the two lookups may round to different sides of it.

    On a CPU, cumsum accumulates in float64 and rounds each prefix once to fp32 (checked in the test): a CDF
    value is within 0.5 ulp <= U C_j <= U S of C_j, and a shard's total within U S_r. In units of U S:
    - draw compares fl(u total) with cdf_j: the total is off by 1, the product's rounding (or its clamp below
      the total) adds 2, cdf_j is off by 1: its answer is the exact one beyond 4.
    - the sharded lookup: an offset P_r (r <= N - 1 shares, each off by U S_r, then r - 1 additions) is off
      by N - 1, the total P_N by N, the target fl(u P_N) by N + 2, fl(target - P_r) adds 1 and the shard's
      cdf_j 1: exact beyond 2N + 3, which covers the choice of the shard (the target against P_{r+1}: 2N + 2)
      and the clamp below a shard's total (reached only within that rounding of it).
    The float64 accumulations (the test's C_j, draw's and the shards' prefixes) add at most 8 V 2^-53 S. So
    beyond W = ((2N + 3) U + 8 V 2^-53) S of every C_j both return the first id whose C_j exceeds u S."""
    c_exact = terms.double().cumsum(-1)
    s = c_exact[:, -1:]
    x = u.double() * s
    w = ((2 * world + 3) * U + 8 * terms.shape[-1] * 2.0 ** -53) * s
    pos = torch.searchsorted(c_exact, x).clamp_(max=terms.shape[-1] - 1)
    dist = torch.minimum((c_exact.gather(-1, pos) - x).abs(), (c_exact.gather(-1, (pos - 1).clamp_(min=0)) - x).abs())
    return dist <= w


def _near_allowed(vocab: int, world: int, draws: int) -> int:
    """How many near-CDF targets `draws` draws may meet: u is numpy's float32 uniform, a multiple of U in [0, 1),
    so u S falls within W of a given C_j with probability <= 2W / S + U, and within W of any of the V values
    with p <= V ((4N + 7) U + 16 V 2^-53). The draws are independent given the logits: the count is below a
    Binomial(draws, p), and exceeds the returned quantile with probability <= NEAR_EXCEEDED."""
    p = vocab * ((4 * world + 7) * U + 16 * vocab * 2.0 ** -53)
    return _binomial_quantile(draws, p, NEAR_EXCEEDED)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name,split,k", CASES, ids=[c[0] for c in CASES])
def test_draws(name, split, k, kind):
    """The draws over the shards against sampling.draw on the full row: each draw's id is draw's except for
    targets near a CDF value (counted; a bounded number), and the rows without such a draw are draw's output
    bit for bit (distinct ids sorted by logit, counts, logits, empty slots)."""
    z = _logits(kind, split.vocab, seed=4)
    comm = InProcess(split.world)
    u = _uniforms(seed=11)
    top, _ = parallel_topk(comm, split, _shards(z, split), k)
    assert torch.equal(parallel_max(comm, split, _shards(z, split)), z.amax(-1, keepdim=True))
    allowed = _near_allowed(split.vocab, split.world, ROWS * DRAWS)
    for t in TEMPS:
        ref_raw, terms, cdf = _reference_lookup(z, u, t)
        assert torch.equal(cdf, terms.double().cumsum(-1).float())  # the premise of _near_cdf_value
        raw, raw_logits = parallel_lookup(comm, split, _shards(z, split), u, t, top[:, :1])
        assert torch.equal(raw_logits, z.gather(-1, raw))
        assert (terms.gather(-1, raw) > 0).all()  # never an id of mass 0
        near = _near_cdf_value(terms, u, split.world)
        differ = raw != ref_raw
        assert not (differ & ~near).any(), f"T={t}: a draw differs from draw's away from every CDF value"
        assert int(near.sum()) <= allowed, f"T={t}: {int(near.sum())} near-CDF targets, more than {allowed}"
        same_rows = ~differ.any(-1)
        got = parallel_draw(comm, split, _shards(z, split), u, t, top[:, :1])
        want = draw(z, u, t)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a[same_rows], b[same_rows])


def test_one_rank_is_the_unsharded_capture():
    """A group of one computes what the unsharded functions compute, to the bit: the same sums over the same
    tensors, and the same lookup and reduction as draw (distinct_draws mirrors draw's reduction)."""
    split = VocabSplit.chunked(301, 1)
    comm = InProcess(1)
    z = _logits("random", 301, seed=5)
    u = _uniforms(seed=12)
    for t in TEMPS:
        got = parallel_head(comm, split, [z.clone()], 16, TEMPS, u, t)
        ref_top, ref_ids = torch.topk(z, 16, dim=-1)
        assert torch.equal(got["top"], ref_top) and torch.equal(got["ids"], ref_ids)
        assert torch.equal(got["sums"], tail_sums(z.clone(), ref_top, ref_ids, TEMPS))
        for key, ref in zip(("sample_ids", "sample_counts", "sample_logits"), draw(z, u, t)):
            assert torch.equal(got[key], ref), (t, key)


def test_torchrun_gloo_equals_in_process(tmp_path):
    """Two ranks under torchrun (gloo, one shard each) return, on both ranks, the in-process results bit for
    bit: the same local work, and only all_gather between the ranks (no backend-ordered reduction)."""
    split = VocabSplit.chunked(301, 2)
    z = _logits("random", 301, seed=6)
    u = _uniforms(seed=13)
    configs = [{"k": 16, "proposal_temperature": 0.7}, {"k": 0, "proposal_temperature": 2.0}]
    inp, out = tmp_path / "in.pt", tmp_path / "out"
    out.mkdir()
    torch.save({"z": z, "uniforms": u, "vocab": 301, "temperatures": TEMPS, "configs": configs}, inp)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(inp), str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    want = [parallel_head(InProcess(2), split, _shards(z, split), cfg["k"], TEMPS, u, cfg["proposal_temperature"])
            for cfg in configs]
    for rank in range(2):
        got = torch.load(out / f"rank{rank}.pt")
        assert len(got) == len(want)
        for cfg, g, w in zip(configs, got, want):
            assert g.keys() == w.keys()
            for key in w:
                assert g[key].dtype == w[key].dtype and torch.equal(g[key], w[key]), (rank, cfg, key)
