"""What a cache holds, resolved once: `CacheSpec`, and the three things made from it.

- `fingerprint()`: what "the same config" means. A rerun with an equal fingerprint resumes or finds the
  cache complete; any other is refused unless --overwrite. It covers the teacher's weights and tokenizer
  (digests), the corpus and its preprocessing, the logit targets, temperatures, layers, codecs and
  compressors, the teacher's dtype and the shard layout. Speed settings are not in it, so changing them
  never invalidates a cache: writer_threads changes no byte, encode_on no data file, and cache.batch_size
  only the fp32 forward's low-order bits (other matmul shapes), within the rounding the stored formats carry.
- `header()`: the manifest's fields other than the shard list (directory.finalize adds that).
- `layout()`: what every shard writer needs (writer.ShardLayout).

The one place where the cache's settings are spelled out: the build, the writer and `cache info` read
them from here or from the manifest this writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from pipeline import targets
from pipeline.cache.codecs import HIDDEN_CODECS, SIDE_LEVELS, count_dtype, id_dtype, pack_order
from pipeline.cache.manifest import FORMAT_VERSION, fingerprint_digest, id_table_record
from pipeline.cache.writer import ShardLayout

LOGITS_LEVEL = 9  # zstd level of the Arrow record batches (input ids, lse planes; the target blobs are compressed already)


def side_compressor(setting: str, layers: list[int]) -> str:
    """cache.side_compressor, resolved: auto is brotli where the side data is the whole cache (no hidden
    layers), zstd where hidden layers are cached: there brotli's ~8 B/token saving is ~0.1% of the bytes and
    costs most of the writer's time (docs/scale.md, the writer's measured costs)."""
    if setting != "auto":
        return setting
    return "zstd" if layers else "brotli"


@dataclass(frozen=True)
class TeacherInfo:
    model: str
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    dtype: str


@dataclass(frozen=True)
class CacheSpec:
    teacher: TeacherInfo
    teacher_digest: str
    tokenizer_digest: str
    corpus_digest: str
    preprocessing: dict  # sources, text field, sequence count, held-out fraction, packing, seed
    seq_len: int
    num_sequences: int
    train_sequences: int
    packing: bool
    layers: tuple[int, ...]
    temperatures: tuple[float, ...]
    logits: str  # cache.logits: the kinds of teacher target stored (pipeline/targets.py LOGITS_MODES)
    topk: int  # 0: no top-k targets
    samples: int  # 0: no sampled targets
    proposal_temperature: float
    sample_seed: int
    logit_dtype: str
    hidden_codec: str
    hidden_compressor: str
    hidden_level: int
    side_compressor: str  # resolved (never auto)
    shard_sequences: int
    chunk_sequences: int
    id_order: np.ndarray = field(repr=False)  # order[rank] = token id (codecs.frequency_order of the corpus)
    # layers stored at another codec than hidden_codec: ((layer, codec), ...); exact targets' layer n
    layer_codecs: tuple[tuple[int, str], ...] = ()
    # exact targets: the head file's record (manifest `exact`: file, checksum, bytes, layer, norm, ...); None
    exact: dict | None = None

    @classmethod
    def from_config(cls, cfg, teacher: TeacherInfo, layers: list[int], seqs, teacher_digest: str,
                    tokenizer_digest: str, order: np.ndarray, exact: dict | None = None) -> "CacheSpec":
        """`exact`: the head file's record (build.py writes the file) when cache.logits stores exact targets."""
        cc, data = cfg.cache, cfg.data
        topk, samples = targets.stored_counts(cc.logits, cc.topk, cc.samples)
        codecs = ()
        if exact is not None and HIDDEN_CODECS.get(cc.exact_codec).name != HIDDEN_CODECS.get(cc.hidden_codec).name:
            codecs = ((int(exact["layer"]), HIDDEN_CODECS.get(cc.exact_codec).name),)
        return cls(
            teacher=teacher, teacher_digest=teacher_digest, tokenizer_digest=tokenizer_digest,
            corpus_digest=seqs.digest(),
            preprocessing={
                "sources": [vars(s).copy() for s in data.sources], "text_field": data.text_field,
                "num_sequences": data.num_sequences, "heldout_fraction": data.heldout_fraction,
                "packing": data.packing, "seed": data.seed,
            },
            seq_len=data.seq_len, num_sequences=len(seqs), train_sequences=seqs.n_train, packing=data.packing,
            layers=tuple(layers), temperatures=tuple(float(t) for t in cc.temperatures), logits=cc.logits,
            topk=topk, samples=samples,
            proposal_temperature=float(cc.proposal_temperature), sample_seed=cc.sample_seed,
            logit_dtype=cc.logit_dtype, hidden_codec=HIDDEN_CODECS.get(cc.hidden_codec).name,
            hidden_compressor=cc.hidden_compressor, hidden_level=cc.compression_level,
            side_compressor=side_compressor(cc.side_compressor, layers),
            shard_sequences=cc.shard_sequences, chunk_sequences=cc.chunk_sequences, id_order=order,
            layer_codecs=codecs, exact=exact,
        )

    @property
    def id_dtype(self) -> np.dtype:
        return id_dtype(self.teacher.vocab_size)

    def shards(self) -> list[tuple[int, int, int]]:
        """(index, first sequence, sequences) of every shard."""
        n = self.num_sequences
        return [(s, s * self.shard_sequences, min(self.shard_sequences, n - s * self.shard_sequences))
                for s in range(math.ceil(n / self.shard_sequences))]

    def _sampling(self) -> dict:
        return {"samples": self.samples, "proposal_temperature": self.proposal_temperature, "seed": self.sample_seed}

    def fingerprint(self) -> dict:
        side = f"{self.side_compressor}-{SIDE_LEVELS[self.side_compressor]}"
        fp = {
            "format_version": FORMAT_VERSION,
            "teacher_digest": self.teacher_digest,
            "tokenizer_digest": self.tokenizer_digest,
            "corpus_digest": self.corpus_digest,
            "preprocessing": self.preprocessing,
            "seq_len": self.seq_len,
            "topk": self.topk,
            "temperatures": list(self.temperatures),
            "layers": list(self.layers),
            "codecs": {
                "hidden": self.hidden_codec, "logits": f"{self.logit_dtype}/delta-planes/{side}",
                "ids": f"{self.id_dtype.name}/frequency-rank-planes/{side}", "hidden_level": self.hidden_level,
                "hidden_compressor": self.hidden_compressor,
            },
            "capture": {"teacher_dtype": self.teacher.dtype, "logits": self.logits},
            "layout": {"shard_sequences": self.shard_sequences, "chunk_sequences": self.chunk_sequences},
        }
        if self.samples:
            fp["sampling"] = self._sampling()
        if self.exact is not None:  # absent otherwise: caches without exact targets keep their fingerprints
            fp["exact"] = {"head_checksum": self.exact["checksum"], "layer": self.exact["layer"]}
        if self.layer_codecs:
            fp["codecs"]["layers"] = {str(i): c for i, c in self.layer_codecs}
        return fp

    def header(self) -> dict:
        fp = self.fingerprint()
        t = self.teacher
        header = {
            "format_version": FORMAT_VERSION,
            "fingerprint": fp,
            "fingerprint_digest": fingerprint_digest(fp),
            "teacher": {"model": t.model, "model_type": t.model_type, "num_layers": t.num_layers,
                        "hidden_size": t.hidden_size, "vocab_size": t.vocab_size, "dtype": t.dtype},
            "seq_len": self.seq_len, "num_sequences": self.num_sequences, "packing": self.packing,
            "topk": self.topk, "temperatures": list(self.temperatures), "layers": list(self.layers),
            "logits": self.logits, "logit_dtype": self.logit_dtype, "id_dtype": self.id_dtype.name,
            "hidden_codec": self.hidden_codec, "side_compressor": self.side_compressor,
            "hidden_codec_bound": HIDDEN_CODECS.get(self.hidden_codec).bound,
            "split": {"train": [0, self.train_sequences], "heldout": [self.train_sequences, self.num_sequences]},
            "shard_sequences": self.shard_sequences, "chunk_sequences": self.chunk_sequences,
            "id_order": id_table_record(pack_order(self.id_order)),
        }
        if self.samples:
            header["sampling"] = {**self._sampling(), "count_dtype": count_dtype(self.samples).name}
        if self.exact is not None:
            header["exact"] = dict(self.exact)
        if self.layer_codecs:
            header["layer_codecs"] = {str(i): c for i, c in self.layer_codecs}
        return header

    def layout(self) -> ShardLayout:
        return ShardLayout(
            seq_len=self.seq_len, topk=self.topk, samples=self.samples, layers=self.layers,
            n_temps=len(self.temperatures), hidden_codec=self.hidden_codec, id_dtype=self.id_dtype.name,
            padded=not self.packing, chunk_sequences=self.chunk_sequences, hidden_level=self.hidden_level,
            logits_level=LOGITS_LEVEL, hidden_compressor=self.hidden_compressor, train_sequences=self.train_sequences,
            id_order=self.id_order.tobytes(), side_compressor=self.side_compressor, layer_codecs=self.layer_codecs,
        )
