"""Compatibility checks between a student, a layer map, the loss and a cache, run before step one.

Each failure is a one-line PipelineError that says what differs and what would fix it.
"""

from __future__ import annotations

from typing import Sequence

from pipeline import targets
from pipeline.errors import PipelineError
from pipeline.targets import cached_temperature


def check_vocab(student_vocab: int, teacher_vocab: int) -> None:
    """The student's output head must have a column for every id the teacher can put in its top-k."""
    if student_vocab < teacher_vocab:
        raise PipelineError(
            f"the student's vocabulary ({student_vocab}) does not cover the cached teacher ids "
            f"(teacher vocabulary {teacher_vocab})"
        )


def check_tokenizer(student_digest: str | None, cache_digest: str | None) -> None:
    """Same token ids mean the same text only with the same tokenizer (skipped when either is unknown)."""
    if student_digest is None or cache_digest is None:
        return
    if student_digest != cache_digest:
        raise PipelineError(
            f"the student's tokenizer (digest {student_digest}) differs from the cache's "
            f"(digest {cache_digest}): the cached token ids would mean different text"
        )


def check_layers(layer_map: dict[int, int], cached_layers: Sequence[int]) -> None:
    """Every teacher layer the map needs must be in the cache."""
    cached = set(int(x) for x in cached_layers)
    for j, t in sorted(layer_map.items()):
        if t not in cached:
            raise PipelineError(
                f"the layer map needs teacher layer {t} (for student layer {j}) but the cache holds only "
                f"layers {sorted(cached)}; change mapping.strategy/stride or rebuild the cache with that layer"
            )


def check_temperature(temperature: float, cached: Sequence[float]) -> None:
    cached_temperature(cached, temperature)


def check_loss_temperature(loss, cached: Sequence[float]) -> None:
    """The loss's temperature must be cached for targets that read a cached lse (top-k, draws); exact targets
    take any temperature, since their logits are rebuilt from layer n (`loss`: a LossSpec)."""
    kind = targets.BY_NAME.get(loss.logits_source)
    if kind is None or kind.reads_cached_temperature:
        check_temperature(loss.temperature, cached)


def check_seq_len(seq_len: int | None, cache_seq_len: int) -> None:
    if seq_len is not None and int(seq_len) != int(cache_seq_len):
        raise PipelineError(
            f"data.seq_len is {seq_len} but the cache holds sequences of {cache_seq_len} tokens; "
            f"set data.seq_len={cache_seq_len} or rebuild the cache"
        )


def check_positions(student_positions: int | None, cache_seq_len: int) -> None:
    """The student must be able to attend over the cache's whole sequences."""
    if student_positions is not None and int(student_positions) < int(cache_seq_len):
        raise PipelineError(
            f"the cache holds sequences of {cache_seq_len} tokens but the student's max_position_embeddings is "
            f"{student_positions}: rebuild the cache with data.seq_len <= {student_positions}"
        )


def check_dynamics_map(loss, layer_map: dict[int, int]) -> None:
    """loss.delta > 0 compares consecutive mapped blocks: the map must have at least two."""
    from pipeline.losses.dynamics import MIN_LAYERS

    if loss.delta > 0 and len(layer_map) < MIN_LAYERS:
        raise PipelineError(
            f"loss.delta > 0 ({loss.dynamics}) compares consecutive mapped student blocks, but the layer map "
            f"{dict(layer_map)} has {len(layer_map)}: map at least {MIN_LAYERS} (mapping.stride/strategy) or set loss.delta=0"
        )


def check_all(
    *,
    facts,
    student_vocab: int,
    student_tokenizer_digest: str | None,
    layer_map: dict[int, int],
    loss,
    student_positions: int | None = None,
) -> None:
    """All checks against the teacher side's facts (pipeline/train/teacher_side.py TeacherFacts), cheapest first;
    a fact the teacher side leaves open (None: the live teacher, or a cache still to be built) is not checked.
    `loss` (a LossSpec, logits_source resolved) says which targets are read: hidden layers only when it needs
    states. `student_positions` is the student's max_position_embeddings."""
    check_vocab(student_vocab, facts.vocab_size)
    if facts.seq_len is not None:
        check_positions(student_positions, facts.seq_len)
    if facts.temperatures is not None:
        check_loss_temperature(loss, facts.temperatures)
    if loss.needs_states and facts.layers is not None:
        check_layers(layer_map, facts.layers)
    check_tokenizer(student_tokenizer_digest, facts.tokenizer_digest)
