"""Layer maps: which teacher block each student block learns from (1-based; 0 = embedding output).

Strategies are registered once; `build_layer_map` applies the optional stride (map every stride-th
student block, always including the last one).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.registry import Registry

LAYER_MAPS: Registry = Registry("layer-map strategy")


@LAYER_MAPS.register("uniform")
def uniform_map(n_student: int, n_teacher: int, kept_layers: list[int] | None = None) -> dict[int, int]:
    # t(j) = round(j * N_t / N_s), halves rounded up, so the last student block maps to the last teacher block
    return {j: max(1, math.floor(j * n_teacher / n_student + 0.5)) for j in range(1, n_student + 1)}


@LAYER_MAPS.register("last")
def last_map(n_student: int, n_teacher: int, kept_layers: list[int] | None = None) -> dict[int, int]:
    return {j: j + (n_teacher - n_student) for j in range(1, n_student + 1)}


@LAYER_MAPS.register("selected")
def selected_map(n_student: int, n_teacher: int, kept_layers: list[int] | None = None) -> dict[int, int]:
    if kept_layers is None:
        raise PipelineError("mapping.strategy=selected needs a pruning.json (with kept_layers) beside the student")
    if len(kept_layers) != n_student:
        raise PipelineError(
            f"pruning.json lists {len(kept_layers)} kept blocks but the student has {n_student}"
        )
    # kept blocks are original 1-based block indices; a 0 (a 0-based record) would shift every pair by one
    bad = [int(t) for t in kept_layers if not 1 <= int(t) <= n_teacher]
    if bad:
        raise PipelineError(f"pruning.json: kept block {bad[0]} is outside 1..{n_teacher} (1-based block indices)")
    return {j: int(t) for j, t in enumerate(kept_layers, start=1)}


def read_kept_layers(student_dir: str | Path | None) -> list[int] | None:
    """Kept original block indices from `pruning.json` beside the student, if there is one."""
    if student_dir is None:
        return None
    path = Path(student_dir) / "pruning.json"
    if not path.is_file():
        return None
    try:
        kept = json.loads(path.read_text()).get("kept_layers")
    except json.JSONDecodeError:
        raise PipelineError(f"{path} is not valid JSON") from None
    return None if kept is None else [int(k) for k in kept]


def build_layer_map(
    strategy: str | dict,
    n_student: int,
    n_teacher: int,
    stride: int = 1,
    kept_layers: list[int] | None = None,
) -> dict[int, int]:
    """{student block j: teacher block t(j)}, validated against both depths."""
    if n_student < 1 or n_teacher < 1:
        raise PipelineError(f"layer map needs positive depths (student {n_student}, teacher {n_teacher})")
    if isinstance(strategy, dict):
        mapping = {int(j): int(t) for j, t in strategy.items()}
    else:
        if n_student > n_teacher and strategy == "last":
            raise PipelineError(f"mapping.strategy=last needs a student ({n_student}) no deeper than the teacher ({n_teacher})")
        mapping = LAYER_MAPS.get(strategy)(n_student, n_teacher, kept_layers)
    for j, t in mapping.items():
        if not 1 <= j <= n_student:
            raise PipelineError(f"layer map: student layer {j} is outside 1..{n_student}")
        if not 0 <= t <= n_teacher:
            raise PipelineError(f"layer map: teacher layer {t} is outside 0..{n_teacher}")
    if stride < 1:
        raise PipelineError(f"mapping.stride: {stride} must be >= 1")
    return {j: t for j, t in sorted(mapping.items()) if (n_student - j) % stride == 0}


def resolve_layers(layers, mapping, student_model: str | None, n_teacher: int) -> list[int]:
    """cache.layers -> sorted teacher layer indices to store: all, a list, or (auto) exactly those the layer map
    of `student_model` (its depth, its pruning.json) needs."""
    if layers == "all":
        return list(range(0, n_teacher + 1))
    if isinstance(layers, list):
        bad = [i for i in layers if not 0 <= i <= n_teacher]
        if bad:
            raise PipelineError(f"cache.layers: layer {bad[0]} is beyond the teacher's depth (0..{n_teacher})")
        return sorted(set(layers))
    # auto: what mapping.strategy needs for the configured student's depth
    if student_model is None:
        raise PipelineError("cache.layers=auto needs student.model (or set cache.layers to a list or all)")
    from pipeline.blocks import text_config
    from pipeline.sources import models

    n_student = text_config(models.load_config(student_model)).num_hidden_layers
    kept = read_kept_layers(student_model) if Path(student_model).is_dir() else None
    layer_map = build_layer_map(mapping.strategy, n_student, n_teacher, mapping.stride, kept)
    return sorted(set(layer_map.values()))
