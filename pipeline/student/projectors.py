"""Learnable projectors from the student's hidden width to the teacher's (docs/architecture.md, section 11).

One module per mapped pair, keyed by str(student_layer): nn.Linear(d_student, d_teacher, bias=False), or
nn.Identity when the widths match. They train with the student and are saved beside it as
`projectors.safetensors` (linear weights only) + `projectors.json` (everything needed to rebuild them),
never baked into the student's weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.atomic import write_file_atomically, write_text_atomic
from pipeline.errors import PipelineError
from pipeline.registry import Registry

WEIGHTS_FILE = "projectors.safetensors"
INDEX_FILE = "projectors.json"
FORMAT_VERSION = 1
XAVIER_GAIN = 0.1  # "small xavier": projected hiddens start near 0, so early hidden loss gradients stay small

Init = Callable[[torch.Tensor, "torch.Generator | None"], None]  # in place on a [d_teacher, d_student] weight

KindResolver = Callable[[int, int], str]  # (d_student, d_teacher) -> "linear" | "identity"

PROJECTOR_INITS: Registry[Init] = Registry("projector init")
PROJECTOR_KINDS: Registry[KindResolver] = Registry("projector kind")


@PROJECTOR_KINDS.register("linear")
def _kind_linear(d_student: int, d_teacher: int) -> str:
    return "linear"


@PROJECTOR_KINDS.register("identity")
def _kind_identity(d_student: int, d_teacher: int) -> str:
    if d_student != d_teacher:
        raise PipelineError(
            f"projector kind 'identity' needs equal widths, got d_student={d_student}, d_teacher={d_teacher}; "
            "use 'linear' or 'auto'"
        )
    return "identity"


@PROJECTOR_KINDS.register("auto")
def _kind_auto(d_student: int, d_teacher: int) -> str:
    return "identity" if d_student == d_teacher else "linear"


@PROJECTOR_INITS.register("xavier")
def _init_xavier(weight: torch.Tensor, generator: torch.Generator | None) -> None:
    nn.init.xavier_uniform_(weight, gain=XAVIER_GAIN, generator=generator)


@PROJECTOR_INITS.register("identity")
def _init_identity(weight: torch.Tensor, generator: torch.Generator | None) -> None:
    # [d_t, d_s]: eye on the leading min(d_t, d_s) block -> x zero-padded (d_t > d_s) or truncated
    nn.init.eye_(weight)


@PROJECTOR_INITS.register("zero")
def _init_zero(weight: torch.Tensor, generator: torch.Generator | None) -> None:
    nn.init.zeros_(weight)


class Projectors(nn.ModuleDict):
    """ModuleDict {str(student_layer): projector} that remembers how it was built (for save/load)."""

    def __init__(
        self,
        modules: dict[str, nn.Module],
        layer_pairs: dict[int, int],
        d_student: int,
        d_teacher: int,
        init: str,
        meta: dict[str, Any] | None = None,
    ):
        super().__init__(modules)
        self.layer_pairs = dict(layer_pairs)
        self.d_student = d_student
        self.d_teacher = d_teacher
        self.init = init
        self.meta = dict(meta or {})

    def kinds(self) -> dict[str, str]:
        return {key: _kind_of(module) for key, module in self.items()}


def _kind_of(module: nn.Module) -> str:
    if isinstance(module, nn.Identity):
        return "identity"
    if isinstance(module, nn.Linear):
        return "linear"
    raise TypeError(f"unexpected projector module {type(module).__name__}")


def _check_layer_pairs(layer_pairs: dict[int, int]) -> dict[int, int]:
    if not layer_pairs:
        raise PipelineError("projectors need at least one (student layer -> teacher layer) pair")
    for s, t in layer_pairs.items():
        for value in (s, t):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PipelineError(f"layer indices must be ints >= 0 (0 = embeddings), got {s!r} -> {t!r}")
    return dict(sorted(layer_pairs.items()))


def _check_width(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PipelineError(f"{name} must be a positive int, got {value!r}")


def _new_linear(d_student: int, d_teacher: int, dtype: torch.dtype = torch.float32) -> nn.Linear:
    # skip_init: no draw from the global RNG for a default init we overwrite anyway
    return torch.nn.utils.skip_init(nn.Linear, d_student, d_teacher, bias=False, dtype=dtype)


def build_projectors(
    layer_pairs: dict[int, int],
    d_student: int,
    d_teacher: int,
    kind: str = "auto",
    init: str = "xavier",
    seed: int | None = None,
) -> Projectors:
    """One projector per student layer in `layer_pairs`, in increasing student-layer order.

    seed: a private generator for the linear inits (same seed -> same weights, global RNG untouched);
    None draws from torch's global RNG.
    """
    pairs = _check_layer_pairs(layer_pairs)
    _check_width("d_student", d_student)
    _check_width("d_teacher", d_teacher)
    resolved = PROJECTOR_KINDS.get(kind)(d_student, d_teacher)
    init_fn = PROJECTOR_INITS.get(init)
    generator = None if seed is None else torch.Generator().manual_seed(seed)

    modules: dict[str, nn.Module] = {}
    for student_layer in pairs:
        if resolved == "identity":
            modules[str(student_layer)] = nn.Identity()
            continue
        linear = _new_linear(d_student, d_teacher)
        with torch.no_grad():
            init_fn(linear.weight, generator)
        modules[str(student_layer)] = linear
    return Projectors(modules, pairs, d_student, d_teacher, init)


def save_projectors(projectors: Projectors, directory: str | os.PathLike, meta: dict[str, Any] | None = None) -> None:
    """Write `projectors.safetensors` then `projectors.json` (the index last), each atomically."""
    if not isinstance(projectors, Projectors):
        raise TypeError(f"save_projectors needs the Projectors from build_projectors, got {type(projectors).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {
        f"{key}.weight": module.weight.detach().to("cpu").contiguous()
        for key, module in projectors.items()
        if isinstance(module, nn.Linear)
    }
    index = {
        "format_version": FORMAT_VERSION,
        "d_student": projectors.d_student,
        "d_teacher": projectors.d_teacher,
        "layer_pairs": {str(s): t for s, t in projectors.layer_pairs.items()},
        "kinds": projectors.kinds(),
        "init": projectors.init,
        "meta": {**projectors.meta, **(meta or {})},
    }
    text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    write_file_atomically(directory / WEIGHTS_FILE, lambda p: save_file(weights, str(p)))
    write_text_atomic(directory / INDEX_FILE, text)


def _read_index(directory: Path) -> dict[str, Any]:
    path = directory / INDEX_FILE
    if not path.is_file():
        raise PipelineError(f"no {INDEX_FILE} in {directory}: not a saved projector folder")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path} is not valid JSON: {exc}") from None
    if index.get("format_version") != FORMAT_VERSION:
        raise PipelineError(
            f"{path}: projector format_version {index.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    return index


def load_projectors(directory: str | os.PathLike) -> Projectors:
    """Rebuild the projectors saved by `save_projectors` (same keys, kinds, weights and dtypes; on CPU)."""
    directory = Path(directory)
    index = _read_index(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise PipelineError(f"no {WEIGHTS_FILE} in {directory}")
    weights = load_file(str(weights_path))
    d_student, d_teacher = int(index["d_student"]), int(index["d_teacher"])

    modules: dict[str, nn.Module] = {}
    for key, kind in index["kinds"].items():
        if kind == "identity":
            modules[key] = nn.Identity()
            continue
        weight = weights.pop(f"{key}.weight", None)
        if weight is None or tuple(weight.shape) != (d_teacher, d_student):
            got = None if weight is None else tuple(weight.shape)
            raise PipelineError(f"{weights_path}: projector {key} weight missing or wrong shape ({got})")
        linear = _new_linear(d_student, d_teacher, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
        modules[key] = linear
    if weights:
        raise PipelineError(f"{weights_path}: unexpected tensors {sorted(weights)} not in {INDEX_FILE}")

    pairs = {int(s): int(t) for s, t in index["layer_pairs"].items()}
    return Projectors(modules, pairs, d_student, d_teacher, index["init"], index.get("meta"))
