"""The kinds of teacher targets: the one owner of what a cache can store of the teacher's distribution per
position, how `cache.logits` spells it, each kind's cache columns, batch keys and labels, its typed batch
targets, and which kind `loss.logits_source` reads.

- **topk**: the k largest logits and their ids; with one lse per cached temperature, the exact mass of the
  tail outside them (the loss's tail bucket).
- **sampled**: K draws per position from softmax(z / Tp) (Sparse Logit Sampling): the distinct ids, how
  often each was drawn, their logits; with the lse at T and at Tp, an unbiased importance-weighted estimate.
- **exact**: the teacher's last block output (layer n, cached among the hidden layers) and its final norm
  and head, stored once per cache: the full distribution, rebuilt chunk by chunk in the loss.

A cache stores one kind or several (`cache.logits: topk+sampled+exact`, always in KINDS order); a run's loss
reads one. Everything else (the cache build and its spec, the dataset, the online collator, the trainer,
the scripts) asks this module. A fourth kind needs a `TargetKind` here with its batch-target type, a codec
for its columns (pipeline/cache/) and a loss (pipeline/losses/).

This module sits below the cache, the teacher and the trainer: it imports none of them (torch only inside
the functions that build tensors).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Union

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    import torch

    from pipeline.head import TeacherHead

AUTO = "auto"


# ----------------------------------------------------------------------------- typed batch targets, [M, ...] rows


@dataclass(frozen=True)
class TopkTargets:
    """The teacher's top-k at M positions: ids [M, k] long, raw logits [M, k] fp32, lse [M] at the loss's T."""

    ids: "torch.Tensor"
    logits: "torch.Tensor"
    lse: "torch.Tensor"

    def rows(self, a: int, b: int) -> "TopkTargets":
        return TopkTargets(self.ids[a:b], self.logits[a:b], self.lse[a:b])


@dataclass(frozen=True)
class SampledTargets:
    """K draws at M positions: distinct ids [M, K] long, their counts [M, K] (0 = an empty slot) and raw
    logits [M, K] fp32, the teacher's lse [M] at the loss's T and at the proposal temperature."""

    ids: "torch.Tensor"
    counts: "torch.Tensor"
    logits: "torch.Tensor"
    lse: "torch.Tensor"
    lse_proposal: "torch.Tensor"
    proposal_temperature: float

    def rows(self, a: int, b: int) -> "SampledTargets":
        return SampledTargets(self.ids[a:b], self.counts[a:b], self.logits[a:b], self.lse[a:b],
                              self.lse_proposal[a:b], self.proposal_temperature)


@dataclass(frozen=True)
class ExactTargets:
    """The full distribution at M positions: the teacher's last block output [M, d_t] and its head, which
    rebuild the logits chunk by chunk."""

    last: "torch.Tensor"
    head: "TeacherHead"

    def rows(self, a: int, b: int) -> "ExactTargets":
        return ExactTargets(self.last[a:b], self.head)


BatchTargets = Union[TopkTargets, SampledTargets, ExactTargets]


# ----------------------------------------------------------------------------- the resolved source of a run


@dataclass(frozen=True)
class TargetSource:
    """The kind a run's divergence reads, resolved against what the teacher side holds, with what that kind
    needs beyond the batch: the proposal temperature of sampled targets; the teacher's head and the layer it
    reads (n) for exact targets (None until the head is loaded)."""

    kind: "TargetKind"
    proposal_temperature: float | None = None
    head: "TeacherHead | None" = None
    layer: int | None = None

    @property
    def name(self) -> str:
        return self.kind.name

    def with_head(self, head: "TeacherHead", layer: int) -> "TargetSource":
        return TargetSource(self.kind, self.proposal_temperature, head, int(layer))

    def batch(self, inputs: Mapping[str, "torch.Tensor"], rows: "torch.Tensor") -> BatchTargets:
        """This kind's targets at the flat positions `rows` [M] of a batch (tensors [B, T, ...])."""
        return self.kind.batch(self, inputs, rows)

    def describe(self, tail: str) -> str:
        return self.kind.describe(self, tail)


# ----------------------------------------------------------------------------- cached temperatures

TEMPERATURE_REL = 1e-6  # a temperature read back from YAML or JSON matches its cached value to this (relative)


def same_temperature(a: float, b: float) -> bool:
    """Whether two temperatures name the same cached lse (float spellings of one setting, e.g. 2 and 2.0)."""
    return abs(float(a) - float(b)) <= TEMPERATURE_REL * max(1.0, abs(float(a)))


def find_temperature(temperatures, temperature: float) -> float | None:
    """The cached temperature (the lse dict's key) equal to `temperature`, else None."""
    return next((t for t in temperatures if same_temperature(t, temperature)), None)


def cached_temperature(temperatures, temperature: float) -> float:
    """The cached temperature equal to `temperature`, else a one-line error listing the cached ones."""
    found = find_temperature(temperatures, temperature)
    if found is None:
        cached = ", ".join(f"{float(t):g}" for t in temperatures)
        raise PipelineError(f"loss.temperature {temperature:g} is not in the cache; cached temperatures: {cached}")
    return found


# ----------------------------------------------------------------------------- the kinds


def hidden_key(layer: int) -> str:
    """The batch key of teacher layer `layer`'s hidden states."""
    return f"hidden_{layer}"


def _flat(inputs: Mapping[str, "torch.Tensor"], key: str, rows: "torch.Tensor") -> "torch.Tensor":
    """inputs[key] [B, T, ...] -> [M, ...] at the flat positions `rows`."""
    x = inputs[key]
    B, T = x.shape[:2]
    return x.reshape(B * T, *x.shape[2:]).index_select(0, rows)


@dataclass(frozen=True)
class TargetKind:
    """One kind of teacher target. `columns`: the Arrow columns a cache stores it in (one compressed blob per
    chunk each); `batch_keys`: the keys a training batch carries it under; `label`: its name in tables."""

    name: str
    label: str
    columns: tuple[str, ...]
    batch_keys: tuple[str, ...]
    reads_cached_temperature: bool  # False: the logits are rebuilt, any loss temperature works

    def label_for(self, count: int | None = None) -> str:
        """The table label, with k or K where the kind has one (e.g. "top-64 + tail bucket")."""
        return self.label.format(count=count)

    # -- per kind below: what a training item, a live-teacher batch and a loss batch hold
    def item(self, sample: Mapping[str, Any], temperature: float, proposal: float | None) -> dict:
        """A cache reader's sample -> this kind's entries of a training item (numpy arrays)."""
        raise NotImplementedError

    def from_capture(self, cap, temperature_index: int, proposal_index: int | None, logits) -> dict:
        """A live teacher's capture -> this kind's batch entries (tensors), as a cache of it would give them;
        `logits` turns a captured logits array (its storage dtype) into float32, as the cache's codec does."""
        raise NotImplementedError

    def batch(self, source: TargetSource, inputs: Mapping[str, "torch.Tensor"], rows: "torch.Tensor"
              ) -> BatchTargets:
        raise NotImplementedError

    def describe(self, source: TargetSource, tail: str) -> str:
        raise NotImplementedError


class _Topk(TargetKind):
    def item(self, sample, temperature, proposal):
        return {"topk_ids": sample["topk_ids"], "topk_logits": sample["topk_logits"], "lse": sample["lse"][temperature]}

    def from_capture(self, cap, temperature_index, proposal_index, logits):
        import numpy as np
        import torch

        return {"topk_ids": torch.from_numpy(cap.topk_ids.astype(np.int64)),
                "topk_logits": torch.from_numpy(logits(cap.topk_logits)),
                "lse": torch.from_numpy(cap.lse[temperature_index])}

    def batch(self, source, inputs, rows):
        return TopkTargets(_flat(inputs, "topk_ids", rows).long(), _flat(inputs, "topk_logits", rows),
                           _flat(inputs, "lse", rows))

    def describe(self, source, tail):
        return f"tail {tail}"


class _Sampled(TargetKind):
    def item(self, sample, temperature, proposal):
        return {"sample_ids": sample["sample_ids"], "sample_counts": sample["sample_counts"],
                "sample_logits": sample["sample_logits"], "lse": sample["lse"][temperature],
                "lse_proposal": sample["lse"][proposal]}

    def from_capture(self, cap, temperature_index, proposal_index, logits):
        import numpy as np
        import torch

        return {"sample_ids": torch.from_numpy(cap.sample_ids.astype(np.int64)),
                "sample_counts": torch.from_numpy(cap.sample_counts.astype(np.float32)),
                "sample_logits": torch.from_numpy(logits(cap.sample_logits)),
                "lse_proposal": torch.from_numpy(cap.lse[proposal_index]),
                "lse": torch.from_numpy(cap.lse[temperature_index])}

    def batch(self, source, inputs, rows):
        return SampledTargets(_flat(inputs, "sample_ids", rows).long(), _flat(inputs, "sample_counts", rows),
                              _flat(inputs, "sample_logits", rows), _flat(inputs, "lse", rows),
                              _flat(inputs, "lse_proposal", rows), float(source.proposal_temperature or 1.0))

    def describe(self, source, tail):
        tp = source.proposal_temperature
        return f"sampled targets{f', proposal T={tp:g}' if tp is not None else ''}"


class _Exact(TargetKind):
    def item(self, sample, temperature, proposal):
        return {}  # layer n is one of the item's hidden layers

    def from_capture(self, cap, temperature_index, proposal_index, logits):
        return {}  # layer n is one of the captured hidden layers

    def batch(self, source, inputs, rows):
        if source.head is None:
            raise ValueError("exact targets need the teacher's head (TargetSource.with_head)")
        return ExactTargets(_flat(inputs, hidden_key(source.layer), rows).reshape(rows.numel(), -1), source.head)

    def describe(self, source, tail):
        return "exact targets"


TOPK = _Topk("topk", "top-{count} + tail bucket", ("topk_ids", "topk_logits"), ("topk_ids", "topk_logits", "lse"),
             reads_cached_temperature=True)
SAMPLED = _Sampled("sampled", "sampled, K = {count}", ("sample_ids", "sample_counts", "sample_logits"),
                   ("sample_ids", "sample_counts", "sample_logits", "lse", "lse_proposal"), reads_cached_temperature=True)
EXACT = _Exact("exact", "exact (full distribution)", (), (), reads_cached_temperature=False)

KINDS: tuple[TargetKind, ...] = (TOPK, SAMPLED, EXACT)  # the order cache.logits spells them in
BY_NAME = {k.name: k for k in KINDS}
# loss.logits_source auto: the first of these the teacher side holds
AUTO_ORDER: tuple[TargetKind, ...] = (EXACT, TOPK, SAMPLED)

# every valid cache.logits: one kind or several joined by "+", in KINDS order
LOGITS_MODES: tuple[str, ...] = tuple("+".join(k.name for k in combo) for r in range(1, len(KINDS) + 1)
                                      for combo in itertools.combinations(KINDS, r))
SOURCES: tuple[str, ...] = (AUTO, *BY_NAME)  # loss.logits_source's choices
COLUMNS: tuple[str, ...] = tuple(c for k in KINDS for c in k.columns)  # every target column a cache may hold


def kind(name: str) -> TargetKind:
    try:
        return BY_NAME[name]
    except KeyError:
        raise PipelineError(f"unknown kind of teacher target {name!r}; known: {', '.join(BY_NAME)}") from None


def parse_logits(mode: str) -> tuple[TargetKind, ...]:
    """cache.logits (or a manifest's `logits`) -> the kinds it stores, in KINDS order."""
    if mode not in LOGITS_MODES:
        raise PipelineError(f"cache.logits: {mode!r} is not one of {', '.join(LOGITS_MODES)}")
    names = mode.split("+")
    return tuple(k for k in KINDS if k.name in names)


def manifest_logits(manifest: dict) -> str:
    """The cache.logits a manifest records (one without the key stores top-k only: its only kind then)."""
    return manifest.get("logits", TOPK.name)


def join(kinds) -> str:
    """The cache.logits spelling of a set of kinds."""
    return "+".join(k.name for k in KINDS if k in set(kinds))


def stored_counts(mode: str, topk: int, samples: int) -> tuple[int, int]:
    """(top-k, draws per position) that cache.logits `mode` stores; 0 = none of that kind."""
    kinds = parse_logits(mode)
    return (topk if TOPK in kinds else 0), (samples if SAMPLED in kinds else 0)


def stores(mode: str, k: TargetKind) -> bool:
    return k in parse_logits(mode)


def resolve_source(requested: str, mode: str, where: str, proposal_temperature: float | None = None) -> TargetSource:
    """loss.logits_source (`requested`: auto or a kind) against a teacher side that holds cache.logits `mode`;
    `where` says what holds it, for the one-line error. Sampled targets carry their proposal temperature."""
    held = parse_logits(mode)
    if requested == AUTO:
        chosen = next(k for k in AUTO_ORDER if k in held)
    else:
        chosen = kind(requested)
        if chosen not in held:
            raise PipelineError(f"loss.logits_source {chosen.name}: {where}; set loss.logits_source={held[0].name} "
                                f"or rebuild with cache.logits={join((*held, chosen))}")
    proposal = float(proposal_temperature) if chosen is SAMPLED and proposal_temperature is not None else None
    return TargetSource(chosen, proposal)
