"""Where models come from: packaged name, local HF folder, local .gguf file, or hub id.

A GGUF file is dequantized once by transformers and saved losslessly (float32) as a plain HF folder
under `models_dir()/<file digest>/`; later loads read that folder (<1 s instead of ~15-25 s).
"""

from __future__ import annotations

import fcntl
import functools
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from pipeline import atomic
from pipeline.dtypes import TORCH_DTYPES
from pipeline.errors import PipelineError
from pipeline.sources.assets import PACKAGED_MODELS, packaged_model_file
from pipeline.sources.digest import file_digest


def models_dir() -> Path:
    return Path(os.environ.get("DISTILL_MODELS_DIR", "cache/models"))


def describe_model_spec(spec: str) -> str:
    """'packaged' | 'gguf' | 'local' | 'hub'; raises for a path that looks local but is missing."""
    if spec in PACKAGED_MODELS:
        return "packaged"
    path = Path(spec)
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise PipelineError(f"GGUF file not found: {spec}")
        return "gguf"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PipelineError(f"{spec} is a folder without config.json, not a Hugging Face model folder")
        return "local"
    if path.exists():
        raise PipelineError(f"{spec} is neither a .gguf file nor a model folder")
    looks_like_hub = spec.count("/") == 1 and not spec.startswith((".", "/")) and all(spec.split("/"))
    if looks_like_hub:
        return "hub"
    raise PipelineError(
        f"model {spec!r} not found: not a packaged name ({', '.join(PACKAGED_MODELS)}), "
        "a local model folder, a .gguf file or a hub id (org/name)"
    )


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # blocking: concurrent ranks wait for one conversion
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@functools.lru_cache(maxsize=None)
def _gguf_digest(path: str, size: int, mtime_ns: int) -> str:
    """The file's digest, once per process for an unchanged file (a build resolves its teacher several times)."""
    return file_digest(path)


def convert_gguf(gguf_path: Path) -> Path:
    """Dequantize `gguf_path` once into a float32 HF folder; returns the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = models_dir()
    st = gguf_path.stat()
    out = root / _gguf_digest(str(gguf_path.resolve()), st.st_size, st.st_mtime_ns)
    if (out / "config.json").is_file():
        return out
    with _file_lock(root / f".{out.name}.lock"):
        if (out / "config.json").is_file():
            return out
        kw = dict(gguf_file=gguf_path.name)
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kw, **NO_HUB_KERNELS)
        # save_pretrained refuses a GGUF-loaded model: rebuild a plain one and copy the dense weights
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
        tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"GGUF conversion lost weights: missing {missing[:3]}, unexpected {unexpected[:3]}")

        def write(tmp: Path) -> None:
            plain.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "source.txt").write_text(f"{gguf_path.resolve()}\n")

        atomic.write_folder_atomically(out, write)
    return out


def resolve_model(spec: str) -> str:
    """A string that `from_pretrained` accepts: a local folder (GGUF converted) or a hub id."""
    kind = describe_model_spec(spec)
    if kind == "packaged":
        return str(convert_gguf(packaged_model_file(spec)))
    if kind == "gguf":
        return str(convert_gguf(Path(spec)))
    return spec


def _hub_error(spec: str, e: Exception, what: str = "model") -> PipelineError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return PipelineError(f"cannot load {what} {spec!r}: {first}")


def load_tokenizer(spec: str, revision: str | None = None):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_model(spec), revision=revision)
    except (OSError, ValueError) as e:
        raise _hub_error(spec, e) from None


def load_config(spec: str, revision: str | None = None):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_model(spec), revision=revision)
    except (OSError, ValueError) as e:
        raise _hub_error(spec, e) from None


def pick_device(name: str = "auto") -> torch.device:
    """auto -> this process's GPU (LOCAL_RANK under torchrun/accelerate) when there is one, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PipelineError(f"teacher.device: {name!r} is not auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"teacher.device: {name} requested but no CUDA device is available")
    return device


# transformers' hub kernels (`use_kernels`, on by default) are never used: on a GPU, model.train() would fetch
# them from the hub, which fails offline, and the losses' exactness is tested against torch's own kernels
NO_HUB_KERNELS = {"use_kernels": False}


def load_weights(spec: str, dtype: str = "float32", revision: str | None = None, what: str = "model",
                 tensor_parallel: int = 1):
    """The model alone (eval mode) from any supported source, without hub kernels (NO_HUB_KERNELS); every
    model the pipeline trains or runs is loaded here. tensor_parallel N > 1 (under torch.distributed, whose
    world is groups x N consecutive ranks): this rank's part of the model under transformers' own TP plan,
    its weights split over the N ranks of its group (tensor_parallel_mesh), already on this rank's device."""
    from transformers import AutoModelForCausalLM

    if dtype not in TORCH_DTYPES:
        raise PipelineError(f"dtype {dtype!r} is not one of {', '.join(TORCH_DTYPES)}")
    where = resolve_model(spec)
    try:
        if tensor_parallel > 1:
            with tensor_parallel_mesh(tensor_parallel) as kw:
                model = AutoModelForCausalLM.from_pretrained(where, dtype=TORCH_DTYPES[dtype], revision=revision,
                                                             **kw, **NO_HUB_KERNELS)
        else:
            model = AutoModelForCausalLM.from_pretrained(where, dtype=TORCH_DTYPES[dtype], revision=revision,
                                                         **NO_HUB_KERNELS)
    except (OSError, ValueError) as e:
        raise _hub_error(spec, e, what) from None
    return model.eval()


@contextmanager
def tensor_parallel_mesh(tp: int):
    """from_pretrained's keyword arguments for tensor parallelism over groups of `tp` consecutive ranks.

    transformers' DistributedConfig(tp_size=N) builds a mesh whose TP axis spans the whole world; several
    groups would need its dp_replicate axis, which also wraps the model in FSDP (gathers weights per forward).
    So with world > N the mesh transformers uses is built here, (pp=1, dp_replicate=groups, fsdp=1, tp=N) on
    the same axes, and handed to it while the config still says dp 1 (no FSDP): each group of N ranks then
    holds one copy of the model, split N ways, and the groups share nothing."""
    import torch.distributed as dist
    from transformers.distributed import DistributedConfig

    world = dist.get_world_size()
    config = DistributedConfig(tp_size=tp)
    if world == tp:
        yield {"distributed_config": config}
        return
    from unittest import mock

    from transformers.distributed import mixin, utils

    def mesh(_config):
        device_type = torch._C._get_accelerator().type
        groups = world // tp
        dense = dist.init_device_mesh(device_type, (1, groups, 1, tp), mesh_dim_names=("pp", "dp_replicate", "fsdp", "tp"))
        expert = dist.init_device_mesh(device_type, (1, groups, tp, 1), mesh_dim_names=("pp", "dp_replicate", "efsdp", "ep"))
        device = utils._bind_local_device(device_type, int(os.environ.get("LOCAL_RANK", 0)))
        return device, utils.TransformersDeviceMesh(dense, expert)

    with mock.patch.object(mixin, "initialize_distributed_mesh", mesh):
        yield {"distributed_config": config}


def load_model(spec: str, dtype: str = "float32", revision: str | None = None):
    """(model in eval mode, tokenizer) from any supported source."""
    return load_weights(spec, dtype, revision), load_tokenizer(spec, revision)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(spec: str) -> bool:
    """Whether `spec` is a folder with tokenizer files of its own (a pruned student may have none)."""
    return Path(spec).is_dir() and any((Path(spec) / f).is_file() for f in TOKENIZER_FILES)
