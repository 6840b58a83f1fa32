"""Typed config schema: YAML sections -> dataclasses, `--set a.b=c` overrides, validation.

Every key is declared once here with its type and, where it has one, its allowed values or range.
An unknown key, a wrong type or an impossible value ends in a `PipelineError` naming the key.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from pipeline import targets
from pipeline.dtypes import LOGIT_DTYPE_NAMES, MODEL_DTYPE_NAMES
from pipeline.errors import PipelineError
from pipeline.losses.spec import LossSpec
from pipeline.registry import Registry
from pipeline.schema import bounded, choice


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` (no dot) as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


@dataclass
class TeacherConfig:
    model: str = "smollm2-135m-instruct"  # packaged name | hub id | local HF dir | .gguf file
    dtype: str = field(default="float32", metadata=choice(*MODEL_DTYPE_NAMES))
    revision: Union[str, None] = None
    device: str = "auto"  # auto (the process's GPU when there is one, else CPU) | cpu | cuda | cuda:N
    # phase one: ranks per tensor-parallel group (transformers' tp_plan; the world is groups x N under torchrun)
    tensor_parallel: int = field(default=1, metadata=bounded(1, None))


@dataclass
class SourceConfig:
    path: str = "wiki-vital"  # packaged corpus | hub dataset id | .jsonl/.json/.parquet/.txt
    weight: float = field(default=1.0, metadata=bounded(0.0, None, lo_open=True))
    name: Union[str, None] = None  # hub dataset config/subset name
    split: str = "train"
    streaming: bool = False  # hub datasets only: stream instead of downloading the whole split
    text_field: Union[str, None] = None  # overrides data.text_field for this source


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    text_field: str = "text"
    seq_len: int = field(default=256, metadata=bounded(2, None))
    num_sequences: int = field(default=512, metadata=bounded(1, None))
    heldout_fraction: float = field(default=0.05, metadata=bounded(0.0, 0.5))
    packing: bool = True
    seed: int = 0
    # held-out sequences that training's periodic evaluation scores (the first N; null = all of them). Not part
    # of the cache: `distill eval --heldout` always scores the whole held-out split.
    eval_sequences: Union[int, None] = field(default=None, metadata=bounded(1, None))


@dataclass
class StudentConfig:
    model: Union[str, None] = None  # HF folder (a pruning.json beside it enables mapping.strategy=selected)
    dtype: str = field(default="float32", metadata=choice(*MODEL_DTYPE_NAMES))


@dataclass
class CacheConfig:
    dir: str = "cache/demo"  # a folder, or any fsspec URL: s3://bucket/prefix, gs://..., memory://...
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for cache.dir (endpoint_url, ...)
    topk: int = field(default=64, metadata=bounded(1, None))
    temperatures: list[float] = field(default_factory=lambda: [1.0, 2.0])
    layers: Union[str, list[int]] = "auto"  # auto | all | [1, 15, 30]
    hidden_codec: str = "bf16"  # registry name, checked against pipeline.cache.codecs
    logit_dtype: str = field(default="fp16", metadata=choice(*LOGIT_DTYPE_NAMES))
    # the teacher's distribution per position: the top-k logits, K draws from it (Sparse Logit Sampling,
    # pipeline/teacher/sampling.py), or both
    logits: str = field(default="topk", metadata=choice(*targets.LOGITS_MODES))
    # exact full-distribution targets: the codec of the teacher's last block output (layer n); fp32 rebuilds
    # its logits bit for bit, fp16 within KL 4e-7, bf16 within 3e-5 (measured by the exact-error study: docs/training.md)
    exact_codec: str = field(default="fp32", metadata=choice("fp32", "fp16", "bf16"))
    samples: int = field(default=64, metadata=bounded(1, 65535))  # K draws per position (logits sampled | topk+sampled)
    proposal_temperature: float = field(default=1.0, metadata=bounded(0.0, None, lo_open=True))  # draws from softmax(z / this)
    sample_seed: int = 0  # the draws of sequence i come from the generator seeded with (sample_seed, i)
    batch_size: int = field(default=8, metadata=bounded(1, None))
    shard_sequences: int = field(default=64, metadata=bounded(1, None))
    chunk_sequences: int = field(default=8, metadata=bounded(1, None))
    compression_level: int = field(default=1, metadata=bounded(1, 22))  # of the hidden states (Blosc caps it at 9)
    hidden_compressor: str = field(default="zstd", metadata=choice("zstd", "lz4"))
    # top-k ids and logits; auto: brotli without hidden layers, zstd with them (pipeline/cache/spec.py)
    side_compressor: str = field(default="auto", metadata=choice("auto", "brotli", "zstd"))
    writer_threads: int = field(default=0, metadata=bounded(0, None))  # encode/compress threads; 0 = every core
    encode_on: str = field(default="auto", metadata=choice("auto", "device", "writer"))  # where hidden states are encoded


@dataclass
class MappingConfig:
    strategy: Union[str, dict[int, int]] = "uniform"  # uniform | last | selected | {1: 2, 2: 4, ...}
    stride: int = field(default=1, metadata=bounded(1, None))  # map every stride-th student layer
    projector: str = field(default="auto", metadata=choice("auto", "linear", "identity"))
    projector_init: str = "xavier"
    projector_lr_multiplier: float = field(default=1.0, metadata=bounded(0.0, None, lo_open=True))  # projector LR = this x training.learning_rate


# The chapter's starting points (6.4, 6.5.1) by pruning kind: `loss.preset: NAME` fills these keys, then
# every key the user wrote (YAML, --set, an ablation variant) overrides them. Temperature stays as
# configured. The divergence's parameters (`logits_args`) travel with the preset's `logits` choice and are
# dropped when the user sets the divergence (logits, logits_args, skew_lambda or skew_alpha) themselves.
LOSS_PRESETS: Registry[dict[str, Any]] = Registry("loss preset")
LOSS_PRESETS.register("depth")({"alpha": 0.5, "beta": 0.5, "gamma": 0.1, "delta": 0.0})
LOSS_PRESETS.register("width")({"alpha": 0.4, "beta": 0.4, "gamma": 0.2, "delta": 0.0})
LOSS_PRESETS.register("depth_width")({"alpha": 0.4, "beta": 0.4, "gamma": 0.2, "delta": 0.0})
LOSS_PRESETS.register("advanced")({
    "alpha": 0.2, "beta": 0.5, "logits": "skew_kl", "logits_args": {"lambda": 0.5},
    "gamma": 0.1, "hidden": "cosine", "delta": 0.2, "dynamics": "fdd",
})
_DIVERGENCE_KEYS = ("logits", "logits_args", "skew_lambda", "skew_alpha")


@dataclass
class EvalConfig:
    # lm-eval stock tasks on the packaged validation splits (pipeline/evaluate/benchmarks.py); [] = none
    tasks: list[str] = field(default_factory=lambda: [
        "arc_easy", "arc_challenge", "hellaswag", "winogrande", "lambada_openai", "piqa"])
    # lm-eval's first N items of each task, or {task: N} (the tasks not named are scored whole)
    limit: Union[int, dict[str, int], None] = None
    batch_size: int = field(default=8, metadata=bounded(1, None))


@dataclass
class AblateEvalConfig:
    tasks: list[str] = field(default_factory=list)  # benchmarks per variant (default none: held-out only)
    limit: Union[int, dict[str, int], None] = None  # as eval.limit
    batch_size: int = field(default=8, metadata=bounded(1, None))


@dataclass
class AblateConfig:
    output_dir: str = "runs/ablate"
    # {variant name: {"section.key": value, ...}}: overrides of the base config, one training run each
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval: AblateEvalConfig = field(default_factory=AblateEvalConfig)


@dataclass
class Config:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    mapping: MappingConfig = field(default_factory=MappingConfig)
    loss: LossSpec = field(default_factory=LossSpec)
    training: dict[str, Any] = field(default_factory=dict)  # handed to transformers.TrainingArguments
    eval: EvalConfig = field(default_factory=EvalConfig)
    ablate: AblateConfig = field(default_factory=AblateConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"mapping {_type_name(k)} -> {_type_name(v)}"
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_INT_TEXT = re.compile(r"[+-]?[0-9]+")


def _json_key(k: Any, kt: Any) -> Any:
    """A mapping key as JSON writes it: object keys are strings, so "2" is the int key 2 (lossless)."""
    if kt is int and isinstance(k, str) and _INT_TEXT.fullmatch(k.strip()):
        return int(k)
    return k


def coerce(value: Any, tp: Any, key: str, from_text: bool = False) -> Any:
    """Check `value` against type `tp`, converting only where it is lossless (int -> float, an enum's value ->
    its member); a `PipelineError` naming `key` otherwise. With `from_text`, a string that spells a number is
    read as one for int and float (values that may arrive quoted, e.g. `training:`'s for TrainingArguments)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return coerce(value, arg, key, from_text)
            except PipelineError:
                continue
        raise PipelineError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            return value
        raise PipelineError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise PipelineError(f"{key}: expected null, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise PipelineError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (arg,) = typing.get_args(tp)
        return [coerce(v, arg, f"{key}[{i}]", from_text) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise PipelineError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        kt, vt = typing.get_args(tp)
        return {coerce(_json_key(k, kt), kt, f"{key} key", from_text): coerce(v, vt, f"{key}.{k}", from_text)
                for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_text and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except (ValueError, TypeError):
            pass
    elif isinstance(tp, type) and isinstance(value, tp):  # an unparameterized dict or list, or any other class
        return value
    raise PipelineError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _check(value: Any, meta: typing.Mapping, key: str) -> None:
    if "choices" in meta and value not in meta["choices"]:
        raise PipelineError(f"{key}: {value!r} is not one of {', '.join(map(str, meta['choices']))}")
    if "range" in meta and value is not None:
        lo, hi, lo_open, hi_open = meta["range"]
        if lo is not None and (value <= lo if lo_open else value < lo):
            raise PipelineError(f"{key}: {value!r} must be {'>' if lo_open else '>='} {lo}")
        if hi is not None and (value >= hi if hi_open else value > hi):
            raise PipelineError(f"{key}: {value!r} must be {'<' if hi_open else '<='} {hi}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PipelineError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise PipelineError(
            f"unknown key {where}{unknown[0]}; allowed in {prefix or 'config'}: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        value = coerce(value, hints[name], key)
        _check(value, fields[name].metadata, key)
        kwargs[name] = value
    return cls(**kwargs)


def _apply_loss_preset(data: dict) -> dict:
    """The raw config mapping with loss.preset's keys filled in under the ones the user wrote."""
    loss = data.get("loss") if isinstance(data, dict) else None
    if not isinstance(loss, dict) or loss.get("preset") is None:
        return data
    name = loss["preset"]
    if not isinstance(name, str):
        raise PipelineError(f"loss.preset: expected str, got {name!r}")
    preset = dict(LOSS_PRESETS.get(name))
    if any(k in loss for k in _DIVERGENCE_KEYS):
        preset.pop("logits_args", None)
    return {**data, "loss": {**preset, **loss}}


def _resolve_skew(loss: LossSpec) -> None:
    """Fold skew_lambda / skew_alpha (lambda = 1 - skew_alpha) into logits_args["lambda"], each given once."""
    if loss.skew_alpha is not None and loss.skew_lambda is not None:
        raise PipelineError("loss.skew_alpha and loss.skew_lambda are two spellings of one setting "
                            "(lambda = 1 - skew_alpha): give one")
    if loss.skew_alpha is None and loss.skew_lambda is None:
        return
    if loss.skew_alpha is not None:
        key, lam = "skew_alpha", round(1.0 - loss.skew_alpha, 12)
        if not 0.0 < loss.skew_alpha <= 1.0:
            raise PipelineError(f"loss.skew_alpha: {loss.skew_alpha!r} must be in (0, 1] "
                                "(s = 0 compares a distribution with itself: the loss is identically 0)")
    else:
        key, lam = "skew_lambda", loss.skew_lambda
        if not 0.0 <= lam < 1.0:
            raise PipelineError(f"loss.skew_lambda: {lam!r} must be in [0, 1) "
                                "(lambda = 1 compares a distribution with itself: the loss is identically 0)")
    if "lambda" in loss.logits_args:
        raise PipelineError(f"loss.{key} and loss.logits_args.lambda set the same parameter: give one")
    loss.logits_args = {**loss.logits_args, "lambda": lam}
    loss.skew_lambda = loss.skew_alpha = None


def _validate(cfg: Config) -> None:
    _resolve_skew(cfg.loss)
    for i, t in enumerate(cfg.cache.temperatures):
        if t <= 0:
            raise PipelineError(f"cache.temperatures[{i}]: {t!r} must be > 0")
    if not cfg.cache.temperatures:
        raise PipelineError("cache.temperatures: at least one temperature is needed")
    if isinstance(cfg.cache.layers, str) and cfg.cache.layers not in ("auto", "all"):
        raise PipelineError(f"cache.layers: {cfg.cache.layers!r} is not auto, all or a list of layer indices")
    if cfg.loss.chunk_tokens != "auto" and cfg.loss.chunk_tokens < 0:
        raise PipelineError(f"loss.chunk_tokens: {cfg.loss.chunk_tokens} must be >= 0 (0 = the dense path)")
    if isinstance(cfg.cache.layers, list):
        for i, layer in enumerate(cfg.cache.layers):
            if layer < 0:
                raise PipelineError(f"cache.layers[{i}]: {layer} must be >= 0 (0 = embedding output)")
    if not cfg.data.sources:
        raise PipelineError("data.sources: at least one source is needed")
    if (targets.stores(cfg.cache.logits, targets.SAMPLED)
            and targets.find_temperature(cfg.cache.temperatures, cfg.cache.proposal_temperature) is None):
        cached = ", ".join(f"{t:g}" for t in cfg.cache.temperatures)
        raise PipelineError(f"cache.proposal_temperature {cfg.cache.proposal_temperature:g} must be one of "
                            f"cache.temperatures ({cached}): the draws' probabilities need its lse")
    if cfg.cache.shard_sequences % cfg.cache.chunk_sequences:
        raise PipelineError(
            f"cache.shard_sequences ({cfg.cache.shard_sequences}) must be a multiple of "
            f"cache.chunk_sequences ({cfg.cache.chunk_sequences})"
        )


def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], YAML-parsed value)."""
    if "=" not in item:
        raise PipelineError(f"--set {item!r}: expected section.key=value")
    path, raw = item.split("=", 1)
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise PipelineError(f"--set {item!r}: empty key")
    try:
        value = _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise PipelineError(f"--set {item!r}: value is not valid YAML ({e.__class__.__name__})") from None
    return keys, value


def set_key(data: dict, keys: list[str], value: Any, where: str) -> None:
    """data[k0][k1]...[kn] = value, creating sections on the way; `where` names the override in errors."""
    node = data
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise PipelineError(f"{where}: {k} is not a section")
        node = nxt
    node[keys[-1]] = value


def apply_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    for item in overrides:
        keys, value = parse_override(item)
        set_key(data, keys, value, f"--set {item!r}")
    return data


def config_from_dict(data: dict) -> Config:
    cfg = _build(Config, _apply_loss_preset(data), "")
    _validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: typing.Iterable[str] = ()) -> Config:
    return config_from_dict(load_config_data(path, overrides))


def load_config_data(path: str | Path | None, overrides: typing.Iterable[str] = ()) -> dict:
    """The YAML mapping with the overrides applied, not yet validated (recipes that derive configs)."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise PipelineError(f"config file not found: {p}")
        try:
            data = _yaml(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise PipelineError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise PipelineError(f"{p}: the top level must be a mapping of sections")
    return apply_overrides(data, overrides)
