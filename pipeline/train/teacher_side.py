"""Where phase two's teacher outputs come from, behind one small interface: a cache (`CachedTeacher`, the normal
path: no teacher weights) or the live teacher (`LiveTeacher`, `distill train --online`: the parity baseline that
shares memory with the student).

Each gives:
- `facts`: what the compatibility checks and the layer map read (`TeacherFacts`: depth, width, vocabulary,
  sequence length, temperatures, layers, tokenizer digest, the kinds of target it holds);
- `load(device)`: the weights, where there are any (the live teacher, once the layer map is known valid);
- `datasets(...)`: the train and held-out splits and their collator;
- `hidden_norms(...)`: the teacher's mean square per layer (the nmse loss's constants);
- `exact_head()`: the teacher's final norm and head, for exact targets;
- `tokenizer()`, `record()`, `close()`.

`TeacherFacts` are also what `distill ablate` checks its variants against before a cache exists (`planned_facts`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

from pipeline import targets
from pipeline.blocks import text_config
from pipeline.errors import PipelineError
from pipeline.sources import models
from pipeline.sources.digest import tokenizer_digest
from pipeline.targets import TargetSource


@dataclass(frozen=True)
class TeacherFacts:
    """The teacher as the checks see it. None for seq_len, temperatures or layers: any (the live teacher
    computes whatever is asked); for layers also "not known yet" (a cache still to be built with layers auto,
    which stores what the maps need)."""

    model: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    logits: str  # the kinds of target it gives, as cache.logits spells them
    holds: str  # how the one-line errors name that, e.g. "the cache holds cache.logits topk"
    seq_len: int | None = None
    temperatures: tuple[float, ...] | None = None
    layers: tuple[int, ...] | None = None
    tokenizer_digest: str | None = None
    proposal_temperature: float | None = None  # of the draws (sampled targets)

    @classmethod
    def from_manifest(cls, m: dict) -> "TeacherFacts":
        t = m["teacher"]
        mode = targets.manifest_logits(m)
        return cls(model=t["model"], num_layers=int(t["num_layers"]), hidden_size=int(t["hidden_size"]),
                   vocab_size=int(t["vocab_size"]), logits=mode, holds=f"the cache holds cache.logits {mode}",
                   seq_len=int(m["seq_len"]), temperatures=tuple(m["temperatures"]), layers=tuple(m["layers"]),
                   tokenizer_digest=m.get("fingerprint", {}).get("tokenizer_digest"),
                   proposal_temperature=(m.get("sampling") or {}).get("proposal_temperature"))

    def source(self, requested: str) -> TargetSource:
        """loss.logits_source (auto or a kind) resolved against what this teacher gives."""
        return targets.resolve_source(requested, self.logits, self.holds, self.proposal_temperature)


def config_facts(cfg, tcfg=None) -> TeacherFacts:
    """The facts of cfg.teacher from its config (no weights), giving what cfg.cache.* describes at data.seq_len;
    any temperature and layer (what the live teacher computes)."""
    tcfg = tcfg or text_config(models.load_config(cfg.teacher.model, cfg.teacher.revision))
    cc = cfg.cache
    return TeacherFacts(model=cfg.teacher.model, num_layers=tcfg.num_hidden_layers, hidden_size=tcfg.hidden_size,
                        vocab_size=tcfg.vocab_size, logits=cc.logits, holds=f"cache.logits is {cc.logits}",
                        seq_len=int(cfg.data.seq_len), proposal_temperature=float(cc.proposal_temperature))


def planned_facts(cfg) -> TeacherFacts:
    """The facts of the cache cfg describes, before it is built (the teacher's config and tokenizer only): its
    sequence length and temperatures, and its layers where cache.layers names them."""
    from pipeline.student.layer_map import resolve_layers

    facts = config_facts(cfg)
    layers = None
    if isinstance(cfg.cache.layers, list) or cfg.cache.layers == "all":
        layers = tuple(resolve_layers(cfg.cache.layers, cfg.mapping, None, facts.num_layers))
    tok = models.load_tokenizer(cfg.teacher.model, cfg.teacher.revision)
    return replace(facts, temperatures=tuple(cfg.cache.temperatures), layers=layers,
                   tokenizer_digest=tokenizer_digest(tok))


# ----------------------------------------------------------------------------- from a cache


class CachedTeacher:
    """The teacher's outputs as a cache holds them: the manifest's facts, the cache's splits, its stored norms
    and head. No teacher weights are loaded."""

    online = False

    def __init__(self, cache_cfg):
        from pipeline.cache.reader import open_cache

        self.cache_cfg = cache_cfg
        self.cache = open_cache(cache_cfg.dir, storage_options=cache_cfg.storage_options)
        self.manifest = self.cache.manifest
        self.facts = TeacherFacts.from_manifest(self.manifest)

    def load(self, device) -> None:
        """Nothing to load: the cache is the teacher."""

    def datasets(self, cfg, loss, source: TargetSource, layers: Sequence[int]):
        """(train, held-out, collator): the cache's splits with only what the loss reads (no hidden layers
        without gamma/delta, no teacher targets without beta)."""
        from pipeline.train.dataset import CacheDataset, collate

        cc = self.cache_cfg
        split = lambda name: CacheDataset(cc.dir, name, layers, loss.temperature, logits=loss.beta > 0,  # noqa: E731
                                          storage_options=cc.storage_options, source=source.name)
        return split("train"), split("heldout"), collate

    def hidden_norms(self, layers: Sequence[int], train, progress: bool) -> dict[int, float]:
        return self.cache.hidden_mean_square(list(layers), progress=progress)

    def exact_head(self):
        """(the stored head, checked against its checksum, and the layer it reads)."""
        return self.cache.teacher_head(), self.cache.exact_layer

    def tokenizer(self):
        """The teacher's tokenizer (no weights), for a student folder that has none; None if unavailable."""
        try:
            return models.load_tokenizer(self.facts.model)
        except Exception:  # noqa: BLE001 - the student folder is still valid without it
            return None

    def record(self) -> dict:
        """What run.json says of the cache it read."""
        m = self.manifest
        return {"dir": self.cache_cfg.dir, "seq_len": m["seq_len"], "topk": m["topk"],
                "fingerprint": m.get("fingerprint"), "fingerprint_digest": m.get("fingerprint_digest")}

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- the live teacher


class LiveTeacher:
    """The live teacher (online runs): its config's facts first, its weights once the layer map is valid, then
    the same targets a cache of cfg.cache.* would hold, captured batch by batch in the collator."""

    online = True

    def __init__(self, cfg):
        self.cfg = cfg
        self.facts = config_facts(cfg)
        self.model = self._tokenizer = self.capture = None

    def load(self, device) -> None:
        """The weights on the training device, beside the student (online mode is the baseline that shares
        memory); the facts then take the head's vocabulary and the tokenizer's digest."""
        t = self.cfg.teacher
        self.model, self._tokenizer = models.load_model(t.model, t.dtype, t.revision)
        self.model.to(device)
        self.facts = replace(self.facts, vocab_size=self.model.get_output_embeddings().weight.shape[0],
                             tokenizer_digest=tokenizer_digest(self._tokenizer))

    def datasets(self, cfg, loss, source: TargetSource, layers: Sequence[int]):
        """(train, held-out, collator) from the data section's sequences; the collator captures the targets of
        `source` and the `layers` (with layer n for exact targets) from the live teacher."""
        from pipeline.data.sequences import sequences_from_config
        from pipeline.teacher.capture import TeacherCapture
        from pipeline.train.dataset import OnlineTeacherCollator, SequenceDataset

        seqs = sequences_from_config(cfg.data, self._tokenizer)
        cc = cfg.cache
        split = lambda rows: SequenceDataset(seqs.input_ids, seqs.lengths, rows, cc.shard_sequences,  # noqa: E731
                                             cc.chunk_sequences)
        captured = set(layers)
        if source.kind is targets.EXACT and loss.beta > 0:
            captured.add(self.facts.num_layers)
        topk, samples = targets.stored_counts(source.name, cc.topk, cc.samples)
        temps = {float(loss.temperature)}
        if source.kind is targets.SAMPLED:
            temps.add(float(source.proposal_temperature))
        self.capture = TeacherCapture(self.model, sorted(captured), topk, sorted(temps), cc.logit_dtype,
                                      samples=samples, proposal_temperature=cc.proposal_temperature,
                                      sample_seed=cc.sample_seed)
        collator = OnlineTeacherCollator(self.capture, loss.temperature, source.name)
        return split(range(0, seqs.n_train)), split(range(seqs.n_train, len(seqs))), collator

    def hidden_norms(self, layers: Sequence[int], train, progress: bool) -> dict[int, float]:
        """The teacher's mean square per captured layer over the train rows (the same fp32 values a cache build
        sums), one no-grad pass before training."""
        import numpy as np
        import torch

        from pipeline.cache.stats import SquareSums
        from pipeline.train.dataset import collate

        acc = SquareSums()
        batch_size = self.cfg.cache.batch_size
        for a in range(0, len(train), batch_size):
            batch = collate([train[i] for i in range(a, min(a + batch_size, len(train)))])
            ids = batch["input_ids"]
            valid = torch.ones(ids.shape, dtype=torch.bool)
            if "length" in batch:
                valid = torch.arange(ids.shape[1])[None, :] < batch["length"][:, None]
            cap = self.capture(ids, valid.long() if "length" in batch else None, sequences=batch["sequence"].tolist())
            acc.add(cap.hidden, np.asarray(valid))
        return acc.mean_square(self.facts.hidden_size)

    def exact_head(self):
        """(the live teacher's own final norm and head, its depth n)."""
        from pipeline.head import teacher_head

        head, why = teacher_head(self.model)
        if head is None:
            raise PipelineError(f"loss.logits_source exact: the teacher's logits cannot be rebuilt from its last "
                                f"block output: {why}")
        return head, self.facts.num_layers

    def tokenizer(self):
        return self._tokenizer

    def record(self) -> dict | None:
        return None

    def close(self) -> None:
        if self.capture is not None:
            self.capture.close()


def open_teacher(cfg, online: bool) -> Any:
    """The teacher side of a run: the cache cfg.cache names, or with `online` the live teacher cfg.teacher names."""
    return LiveTeacher(cfg) if online else CachedTeacher(cfg.cache)
