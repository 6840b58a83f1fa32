"""Shared fixtures: tiny random teachers built from configs, small corpora, config files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# no hub at test time: a hub id that is not cached fails at once instead of retrying
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
# converted packaged models are shared between tests (and with the demo) to pay the GGUF load once
os.environ.setdefault("DISTILL_MODELS_DIR", str(REPO / "cache" / "models"))


@pytest.fixture(scope="session")
def smollm_tokenizer():
    from pipeline.sources.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def make_tiny_model(path: Path, tokenizer, vocab: int, layers: int = 4, hidden: int = 32, arch: str = "llama",
                    seed: int = 0) -> Path:
    """A random model folder (with the given tokenizer) built from a config, no download."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "gemma3":
        cfg = transformers.Gemma3TextConfig(**common, head_dim=16, sliding_window=16)
        model = transformers.Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    # random init gives near-uniform logits; scale the head so top-k is meaningful
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, smollm_tokenizer) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", smollm_tokenizer, vocab=49152)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """A .txt corpus: documents separated by blank lines."""
    words = ("the cat sat on a mat while distant rivers carried old stories about kings queens and "
             "wandering scholars who measured stars").split()
    docs = []
    for i in range(120):
        n = 20 + (i * 7) % 60
        docs.append(" ".join(words[(i + j * 3) % len(words)] for j in range(n)) + f" number {i}.")
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(docs))
    return path


def write_config(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


@pytest.fixture
def tiny_config(tmp_path, tiny_teacher, corpus_file):
    """(config path, cache dir) of a small build on the tiny teacher."""

    def make(**overrides):
        cfg = {
            "teacher": {"model": str(tiny_teacher)},
            "data": {"sources": [{"path": str(corpus_file)}], "seq_len": 32, "num_sequences": 24,
                     "heldout_fraction": 0.125, "seed": 0},
            "cache": {"dir": str(tmp_path / "cache"), "topk": 8, "temperatures": [1.0, 2.0],
                      "layers": [0, 2, 4], "hidden_codec": "bf16", "batch_size": 4, "shard_sequences": 8,
                      "chunk_sequences": 4},
        }
        for key, value in overrides.items():
            section, name = key.split("__")
            cfg.setdefault(section, {})[name] = value
        return write_config(tmp_path / "config.yaml", **cfg), Path(cfg["cache"]["dir"])

    return make
