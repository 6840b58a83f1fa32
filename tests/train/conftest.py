"""Tiny random teacher/student pair with a byte-level tokenizer, and a lossless cache built from them.

Lossless: topk = vocab size, fp32 logits, fp32 hidden states, so cache-based and online losses agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

VOCAB = 258  # 256 bytes + <s> + </s>
SEQ_LEN = 32


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<s>"], vocab["</s>"] = 256, 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_llama(layers: int, hidden: int, seed: int, vocab: int = VOCAB, init_range: float = 0.02):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=256,
        eos_token_id=257, tie_word_embeddings=False, initializer_range=init_range,
    )
    return LlamaForCausalLM(cfg)


def save_model(model, tok, path: Path) -> str:
    model.save_pretrained(path)
    if tok is not None:
        tok.save_pretrained(path)
    return str(path)


def base_overrides(root: Path, teacher: str, student: str, cache_dir: str) -> list[str]:
    return [
        f"teacher.model={teacher}", f"student.model={student}", f"cache.dir={cache_dir}",
        f"data.seq_len={SEQ_LEN}", "data.num_sequences=14", "data.heldout_fraction=0.15",
        f"cache.topk={VOCAB}", "cache.logit_dtype=fp32", "cache.hidden_codec=fp32", "cache.temperatures=[1.0, 2.0]",
        "cache.layers=auto", "cache.batch_size=4", "cache.shard_sequences=8", "cache.chunk_sequences=4",
        "mapping.strategy=uniform", "loss.temperature=2.0",
    ]


def training_overrides(out: Path, **extra) -> list[str]:
    base = {
        "output_dir": str(out), "per_device_train_batch_size": 2, "learning_rate": 1e-3, "max_steps": 1,
        "logging_steps": 1, "save_strategy": "no", "seed": 3, "use_cpu": True,
    }
    base.update(extra)
    return [f"training.{k}={json.dumps(v)}" for k, v in base.items()]


def tiny_pair(root: Path) -> tuple[str, str]:
    """(teacher, student) folders: a 4-block d=32 teacher with a sharp head, a 2-block d=24 student."""
    tok = byte_tokenizer()
    teacher = save_model(tiny_llama(4, 32, seed=0, init_range=0.2), tok, root / "teacher")
    student = save_model(tiny_llama(2, 24, seed=1), tok, root / "student")
    return teacher, student


def tiny_cache(root: Path, extra: list[str]) -> dict:
    """{root, teacher, student, overrides}: the tiny pair under `root` and a cache built with the base
    overrides plus `extra` (cache.* settings of the targets under test)."""
    from pipeline.config import load_config
    from pipeline.recipes.cache import build_cache

    teacher, student = tiny_pair(root)
    overrides = base_overrides(root, teacher, student, str(root / "cache")) + extra
    build_cache(load_config(None, overrides))
    return {"root": root, "teacher": teacher, "student": student, "overrides": overrides}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """{root, teacher, student, cache, overrides}: a 4-block d=32 teacher, a 2-block d=24 student."""
    from pipeline.config import load_config
    from pipeline.recipes.cache import build_cache

    root = tmp_path_factory.mktemp("tiny")
    teacher, student = tiny_pair(root)
    cache_dir = str(root / "cache")
    overrides = base_overrides(root, teacher, student, cache_dir)
    build_cache(load_config(None, overrides))
    return {"root": root, "teacher": teacher, "student": student, "cache": cache_dir, "overrides": overrides}


@pytest.fixture
def train_overrides():
    """training_overrides(out, **extra) -> ['training.k=v', ...] (tiny, CPU, one step by default)."""
    return training_overrides


class _Factory:
    @staticmethod
    def model(path: Path, layers: int = 2, hidden: int = 24, vocab: int = VOCAB, with_tokenizer: bool = True,
              seed: int = 1) -> str:
        return save_model(tiny_llama(layers, hidden, seed, vocab=vocab), byte_tokenizer() if with_tokenizer else None, path)


@pytest.fixture
def tiny_factory():
    """tiny_factory.model(path, layers=2, hidden=24, vocab=258, with_tokenizer=True) -> saved HF folder."""
    return _Factory
