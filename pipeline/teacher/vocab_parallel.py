"""The capture's LM-head work over a vocabulary split between the ranks of a tensor-parallel group.

A teacher run with tensor parallelism holds the LM-head weight split by rows (vocabulary ids) over the N ranks
of its group, and every rank holds the same final hidden states. As in Megatron-LM's vocabulary-parallel
cross-entropy, each rank then computes the logits of its own ids only, z_r = transform(h @ W_r.T) [c, V_r]
(the final-logit transforms of pipeline/head.py act elementwise, so they apply shard by shard), and the
functions here combine what the capture needs from those shards without building [c, V] anywhere or
gathering the weight:

- the top-k (`parallel_topk`): each rank's local top-k, gathered, merged (`merge_topk`);
- the tail sums S_out,T outside the top-k (`parallel_tail_sums`): each rank sums its own ids' terms, the N
  partial sums are added; `parallel_stored_lse` hands them to capture.finish_lse, unchanged;
- the sampled draws (`parallel_draw`): each rank's share of the proposal mass, gathered, decides which
  shard every target falls into; that shard's rank looks it up in its own CDF.

Per head chunk of c tokens each rank receives N c (2k + n_temps + 1 + 2K) numbers (k: top-k, K: draws),
never O(c V).

The split. `VocabSplit` holds each rank's contiguous id range [start, end). `VocabSplit.chunked(V, N)` is the
split of a DTensor Shard(0) placement, which transformers' `tp_plan` gives the LM-head weight (its stock
forward then gathers the full logits, so the capture applies the local weight itself): torch.chunk's
rule, ceil(V / N) ids per rank, so the last ranks are shorter and may be empty when N does not divide V. A
head whose rows were padded to a multiple of N (Megatron's make-vocab-size-divisible-by) passes the ranges of
the real ids and its local logits cut to them, so no padding row takes part in a top-k, a tail or a draw.

The communicator. The same code runs with every rank in one process (`InProcess`: the tests check it
against the unsharded capture functions) and with one rank per process (`Distributed`, over a
torch.distributed group: gloo on a CPU, nccl on CUDA). A process holds the shards of `comm.ranks` and every
function takes one tensor per held shard; `all_gather` returns the rank-ordered stack, the same in every
process. It is the only collective: sums over ranks are taken from the gathered values in rank order, not
with all_reduce, whose reduction order depends on the backend, its algorithm and the message size. So every
rank gets the same bits, and a distributed run gets the bits of the in-process one on the same kind of device.

Exactness against the unsharded capture (capture.tail_sums, capture.finish_lse, sampling.draw, torch.topk):

- top-k values are the same; ids differ only where logits tie (`merge_topk`);
- every tail term exp((z - max z) / T) is the same fp32 number (the global max is the merged top value 0);
  only the order of the fp32 sum differs (N local sums, then N - 1 additions), so the two are within
  gamma(V - 1) and gamma(h) (h = largest shard - 1 + N - 1) times S of the exact sum of the same terms, and
  the stored lse within its fp32 rounding plus those relative errors times the tail tau;
- a draw is the same id unless its target lies within the rounding of the cumulative sums of a CDF value
  (each rank's cumulative sums start at 0 and the shards' totals are added in fp32).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from pipeline.teacher.capture import exp_sums, finish_lse
from pipeline.teacher.sampling import distinct_draws


@dataclass(frozen=True)
class VocabSplit:
    """The ids [start, end) of every rank of the group: contiguous, in rank order, covering [0, vocab)."""

    vocab: int
    bounds: tuple[tuple[int, int], ...]

    def __post_init__(self):
        ends = [0] + [e for _, e in self.bounds]
        tiled = all(s == ends[r] and e >= s for r, (s, e) in enumerate(self.bounds))
        if not self.bounds or not tiled or ends[-1] != self.vocab:
            raise ValueError(f"vocabulary split {self.bounds}: the ranks' id ranges must tile [0, {self.vocab}) "
                             "in order")

    @classmethod
    def chunked(cls, vocab: int, world: int) -> VocabSplit:
        """DTensor Shard(0)'s split (torch.chunk): ceil(vocab / world) ids per rank, the last ranks shorter or
        empty."""
        size = -(-vocab // world)
        return cls(vocab, tuple((min(r * size, vocab), min((r + 1) * size, vocab)) for r in range(world)))

    @property
    def world(self) -> int:
        return len(self.bounds)

    def shard(self, z: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank `rank`'s columns of full-vocabulary logits [c, V] (a copy): what that rank's head computes."""
        start, end = self.bounds[rank]
        return z[:, start:end].clone()


class Communicator(Protocol):
    """The ranks of one tensor-parallel group, as seen from one process."""

    world: int  # ranks in the group
    ranks: tuple[int, ...]  # the ranks whose shards this process holds, in order

    def all_gather(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        """xs: one tensor per held rank, of the same shape and dtype on every rank -> [world, *shape], in rank
        order, the same in every process."""
        ...


class InProcess:
    """Every rank of the group in this process (simulated shards)."""

    def __init__(self, world: int):
        self.world, self.ranks = int(world), tuple(range(world))

    def all_gather(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(xs) != self.world:
            raise ValueError(f"all_gather: {len(xs)} tensors for {self.world} ranks")
        return torch.stack(list(xs))


class Distributed:
    """This process's rank of a torch.distributed group (None: the default group)."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self._dist, self.group = dist, group
        self.world, self.ranks = dist.get_world_size(group), (dist.get_rank(group),)

    def all_gather(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        (x,) = xs
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(self.world)]
        self._dist.all_gather(out, x, group=self.group)
        return torch.stack(out)


def _held(comm: Communicator, split: VocabSplit, zs: Sequence[torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
    """[(start, z)] of the held shards, after checking that they are the split's."""
    if split.world != comm.world:
        raise ValueError(f"a split over {split.world} ranks for a group of {comm.world}")
    if len(zs) != len(comm.ranks):
        raise ValueError(f"{len(zs)} logit shards for the {len(comm.ranks)} ranks this process holds")
    out = []
    for r, z in zip(comm.ranks, zs):
        start, end = split.bounds[r]
        if z.dim() != 2 or z.shape[-1] != end - start:
            raise ValueError(f"rank {r}: logits {tuple(z.shape)} for its {end - start} ids [{start}, {end})")
        out.append((start, z))
    return out


def _rank_sum(parts: torch.Tensor) -> torch.Tensor:
    """The sum over dim 0 of gathered per-rank values, added in rank order (the same bits everywhere)."""
    out = parts[0].clone()
    for p in parts[1:]:
        out += p
    return out


def local_topk(z: torch.Tensor, start: int, k: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One shard's top-k: values [c, k] fp32 descending and global ids [c, k] long. A shard of fewer than k
    ids (k above the shard's size, or an empty last shard) pads with -inf at id `vocab`, past every real
    id, so the merge takes a real id before a pad even where real logits are -inf."""
    kk = min(k, z.shape[-1])
    v, i = torch.topk(z, kk, dim=-1)
    i = i + start
    if kk < k:
        c = z.shape[0]
        v = torch.cat([v, v.new_full((c, k - kk), float("-inf"))], dim=-1)
        i = torch.cat([i, i.new_full((c, k - kk), vocab)], dim=-1)
    return v, i


def merge_topk(values: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global top-k of the gathered local ones: values [N, c, k] fp32 (each rank's descending), ids
    [N, c, k] global -> values [c, k], ids [c, k], in the order (value descending, then id ascending).

    Relation to torch.topk on the full row, whose order among equal values (and choice among those tied at
    the k-th value) is unspecified: the values are the same tensor (the k largest, descending). The ids are
    the same set and order wherever the row has no ties among its top k + 1 values; elsewhere they differ
    only by a permutation of, or a swap between, ids of equal logits. Among equal values this merge puts the
    smaller id first. It is the stable descending sort of the full row (ties by id) except where ties
    straddle a shard's own k-th value: that shard's torch.topk chose among them, as the unsharded capture's
    torch.topk chooses on the full row. The result depends on the gathered inputs only, so every rank gets
    the same."""
    n, c, _ = values.shape
    v = values.permute(1, 0, 2).reshape(c, n * k)
    i = ids.permute(1, 0, 2).reshape(c, n * k)
    i, order = i.sort(dim=-1)  # ids are distinct but for the pads (equal pairs), so any sort orders them alike
    v = v.gather(-1, order)
    v, order = v.sort(dim=-1, descending=True, stable=True)
    return v[:, :k].contiguous(), i.gather(-1, order[:, :k])


def parallel_topk(comm: Communicator, split: VocabSplit, zs: Sequence[torch.Tensor], k: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of the whole vocabulary from the held shards' logits -> (values [c, k] fp32 descending, ids
    [c, k] long), the same on every rank. 1 <= k <= vocab; k may exceed a shard's size (see local_topk)."""
    held = _held(comm, split, zs)
    if not 1 <= k <= split.vocab:
        raise ValueError(f"top-k {k} must be between 1 and the vocabulary size {split.vocab}")
    local = [local_topk(z, start, k, split.vocab) for start, z in held]
    return merge_topk(comm.all_gather([v for v, _ in local]), comm.all_gather([i for _, i in local]), k)


def parallel_max(comm: Communicator, split: VocabSplit, zs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The row maxima of the whole vocabulary -> [c, 1] (what the draws and a top-k-free lse need when no
    top-k gives it)."""
    held = _held(comm, split, zs)
    local = [z.amax(dim=-1) if z.shape[-1] else z.new_full(z.shape[:1], float("-inf")) for _, z in held]
    return comm.all_gather(local).amax(dim=0).unsqueeze(-1)


def local_tail_sums(z: torch.Tensor, start: int, gmax: torch.Tensor, top_ids: torch.Tensor,
                    temperatures: list[float], buffer: torch.Tensor | None = None) -> torch.Tensor:
    """One shard's part of S_out,T: the sum over its ids outside the global top-k of exp((z - gmax) / T) ->
    [n_temps, c] fp32. gmax [c, 1] the global max (the merged top value 0), top_ids [c, k] the global top-k
    ids (any shard's; empty for the full-vocabulary sum). z [c, V_r] is overwritten as capture.tail_sums
    overwrites its logits, with the same fp32 operations, so every term is the number the unsharded sum adds.
    The top-k ids of other shards are sent to a spare column of the mask (a scatter with an index per slot,
    no data-dependent shapes and no host sync)."""
    c, n = z.shape
    out = torch.zeros(len(temperatures), c, dtype=torch.float32, device=z.device)
    if n == 0:
        return out
    inside = (top_ids >= start) & (top_ids < start + n)
    cols = torch.where(inside, top_ids - start, n)
    mask = torch.zeros(c, n + 1, dtype=torch.bool, device=z.device).scatter_(-1, cols, True)
    z.masked_fill_(mask[:, :n], float("-inf"))
    del mask
    z.sub_(gmax)  # <= 0 everywhere: no exponential overflows
    return exp_sums(z, temperatures, buffer)


def parallel_tail_sums(comm: Communicator, split: VocabSplit, zs: Sequence[torch.Tensor], gmax: torch.Tensor,
                       top_ids: torch.Tensor, temperatures: list[float], buffer: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """S_out,T of the whole vocabulary -> [n_temps, c] fp32, the same on every rank: what capture.tail_sums
    returns on the full row, summed in another order. The held shards are overwritten (local_tail_sums)."""
    held = _held(comm, split, zs)
    return _rank_sum(comm.all_gather([local_tail_sums(z, start, gmax, top_ids, temperatures, buffer)
                                      for start, z in held]))


def parallel_stored_lse(comm: Communicator, split: VocabSplit, zs: Sequence[torch.Tensor], top: torch.Tensor | None,
                        top_ids: torch.Tensor | None, stored: torch.Tensor | None, temperatures: list[float]
                        ) -> torch.Tensor:
    """capture.stored_lse over the split -> [n_temps, c] float32: the tail sums over the shards, then
    capture.finish_lse on the top-k as the unsharded capture finishes them. Without a top-k (top None or of
    width 0: sampled targets only) the full-vocabulary lse, log S_T + max z / T in fp32, with S_T the sum of
    exp((z - max z) / T) over every id. The held shards are overwritten."""
    if top is not None and top.shape[-1]:
        return finish_lse(top, stored, parallel_tail_sums(comm, split, zs, top[:, :1], top_ids, temperatures),
                          temperatures)
    return _full_lse(comm, split, zs, parallel_max(comm, split, zs), temperatures)


def _full_lse(comm: Communicator, split: VocabSplit, zs: Sequence[torch.Tensor], gmax: torch.Tensor,
              temperatures: list[float]) -> torch.Tensor:
    """logsumexp(z / T) over the whole vocabulary -> [n_temps, c] fp32, as log S_T + gmax / T."""
    no_ids = torch.empty(gmax.shape[0], 0, dtype=torch.long, device=gmax.device)
    sums = parallel_tail_sums(comm, split, zs, gmax, no_ids, temperatures)
    return torch.stack([sums[ti].log() + (gmax[:, 0] / t if t != 1.0 else gmax[:, 0])
                        for ti, t in enumerate(temperatures)])


def parallel_lookup(comm: Communicator, split: VocabSplit, zs: Sequence[torch.Tensor], uniforms: torch.Tensor,
                    temperature: float, gmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every draw's id and logit -> (ids [c, K] long, logits [c, K] fp32), the same on every rank: sampling.draw's
    inverse-CDF lookup of the targets u * total in the CDF of exp((z - gmax) / T) over the whole vocabulary.

    Each rank takes the cumulative sums of its own terms (the same fp32 terms as draw's) and its shard's
    total; the totals are gathered and added in rank order in fp32, giving each shard's offset P_r and the
    total. Every rank places every target (u * total, kept below the total as draw keeps it) in a shard, the
    first r with P_{r+1} > target (a shard of mass 0 never is one), and looks up target - P_r in its own
    cumulative sums. target < P_{r+1} = fl(P_r + share_r) puts target - P_r below the share exactly; its
    fp32 rounding can reach the share only in a tie, and is kept below it (as draw keeps its targets below
    the total), so the id found has mass > 0. The owning shard's id and logit of each draw are gathered.
    draw's fp32 cumulative sum over the full row and this one (a sum of shard totals, then the shard's own)
    round differently, so a target within that rounding of a CDF value can fall on the neighbouring id;
    elsewhere the ids are draw's."""
    held = _held(comm, split, zs)
    c, K = uniforms.shape
    device = gmax.device
    u = uniforms.to(device, torch.float32)
    cdfs, totals = [], []
    for _, z in held:
        e = torch.sub(z, gmax)
        if temperature != 1.0:  # (dividing by 1 is exact: the same terms either way, as in draw)
            e.div_(temperature)
        cdf = e.exp_().cumsum_(dim=-1)
        cdfs.append(cdf)
        totals.append(cdf[:, -1] if cdf.shape[-1] else cdf.new_zeros(c))
    shares = comm.all_gather(totals)  # [N, c]
    prefix = [torch.zeros(c, dtype=torch.float32, device=device)]
    for share in shares:
        prefix.append(prefix[-1] + share)
    offsets = torch.stack(prefix, dim=-1)  # [c, N + 1]: P_0 = 0, ..., P_N = the total
    total = offsets[:, -1:]
    zero = torch.zeros_like(total)
    target = torch.minimum(u * total, torch.nextafter(total, zero))
    owner = torch.searchsorted(offsets[:, 1:].contiguous(), target, right=True)  # [c, K] in [0, N)
    local_ids, local_logits = [], []
    for r, (start, z), cdf in zip(comm.ranks, held, cdfs):
        n = z.shape[-1]
        if n == 0:  # owns no draw
            local_ids.append(torch.full((c, K), -1, dtype=torch.long, device=device))
            local_logits.append(torch.zeros(c, K, dtype=torch.float32, device=device))
            continue
        share = cdf[:, -1:]
        local = torch.minimum(target - offsets[:, r : r + 1], torch.nextafter(share, zero))
        j = torch.searchsorted(cdf, local, right=True).clamp_(max=n - 1)  # clamped: draws of other shards
        mine = owner == r
        local_ids.append(torch.where(mine, j + start, -1))
        local_logits.append(torch.where(mine, z.gather(-1, j), 0.0))
    pick = owner.unsqueeze(0)
    ids = comm.all_gather(local_ids).gather(0, pick).squeeze(0)
    logits = comm.all_gather(local_logits).gather(0, pick).squeeze(0)
    return ids, logits


def parallel_draw(comm: Communicator, split: VocabSplit, zs: Sequence[torch.Tensor], uniforms: torch.Tensor,
                  temperature: float, gmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sampling.draw over the split -> (ids, counts, logits) [c, K], the same on every rank. gmax [c, 1]: the
    global max (the merged top value 0, or parallel_max). The shards are read, not written."""
    return distinct_draws(*parallel_lookup(comm, split, zs, uniforms, temperature, gmax))


def parallel_head(comm: Communicator, split: VocabSplit, zs: Sequence[torch.Tensor], k: int,
                  temperatures: list[float], uniforms: torch.Tensor | None = None, proposal_temperature: float = 1.0,
                  buffer: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One head chunk as TeacherCapture._head_outputs handles it, over the split: {"ids" [c, k] long, "top" [c, k]
    fp32, "sums" [n_temps, c]} (the tail sums for capture.finish_lse; with k = 0 the full-vocabulary lse), and
    with uniforms [c, K] {"sample_ids", "sample_counts", "sample_logits"} as sampling.draw returns them. The
    same on every rank. The draws are taken before the tail sums overwrite the held shards."""
    if k:
        top, ids = parallel_topk(comm, split, zs, k)
        gmax = top[:, :1]
    else:
        gmax = parallel_max(comm, split, zs)
    out = {}
    if uniforms is not None:
        out["sample_ids"], out["sample_counts"], out["sample_logits"] = parallel_draw(
            comm, split, zs, uniforms, proposal_temperature, gmax)
    if k:
        out.update(ids=ids, top=top, sums=parallel_tail_sums(comm, split, zs, gmax, ids, temperatures, buffer))
    else:
        out["sums"] = _full_lse(comm, split, zs, gmax, temperatures)
    return out


@dataclass(frozen=True)
class HeadShard:
    """This process's rank of a tensor-parallel teacher's head: the group, the split and the rank's own rows of
    the head weight [V_r, d] (a plain tensor, what TeacherCapture multiplies the final hidden states by)."""

    comm: Distributed
    split: VocabSplit
    weight: torch.Tensor


def head_shard(weight: torch.Tensor, group=None) -> HeadShard:
    """The HeadShard of a head weight [V, d] over a torch.distributed group (None: the default group). A DTensor
    split by rows (Shard(0), what transformers' tp_plan gives a Linear head) gives its local rows, whose range
    is VocabSplit.chunked's; a DTensor replicated over the group, or a plain tensor (a plan that leaves the head
    whole), gives its rows of that split, sliced (a view: no copy of the weight). Any other placement is
    refused. The DTensor's mesh must be the group's ranks, in order."""
    comm = Distributed(group)
    (rank,) = comm.ranks
    vocab = weight.shape[0]
    split = VocabSplit.chunked(vocab, comm.world)
    start, end = split.bounds[rank]
    if hasattr(weight, "to_local"):  # a DTensor
        from torch.distributed import get_process_group_ranks
        from torch.distributed.tensor import Replicate, Shard

        mesh_ranks = weight.device_mesh.mesh.flatten().tolist()
        group_ranks = get_process_group_ranks(group) if group is not None else list(range(comm.world))
        if mesh_ranks != group_ranks:
            raise ValueError(f"the head weight is split over ranks {mesh_ranks}, the tensor-parallel group is "
                             f"{group_ranks}")
        (placement,) = weight.placements
        local = weight.to_local()
        if isinstance(placement, Replicate):
            local = local[start:end]
        elif not (isinstance(placement, Shard) and placement.dim == 0 and local.shape[0] == end - start):
            raise ValueError(f"the head weight's placement {placement} (local rows {local.shape[0]}) is not a "
                             f"split of its {vocab} rows into [{start}, {end}) on rank {rank}")
    else:
        local = weight[start:end]
    return HeadShard(comm, split, local.detach())
