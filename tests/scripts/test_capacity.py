"""scripts/plan/capacity.py: its parameter counts, the base of every term, against transformers' own models
(built on the meta device, so no memory), and the printed tables end to end."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from scripts.plan import capacity


def _llama(s: capacity.Shape) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=int(s.d), num_hidden_layers=int(s.layers), intermediate_size=int(s.ffn),
                         vocab_size=s.vocab, num_attention_heads=int(s.heads), num_key_value_heads=s.kv_heads,
                         head_dim=s.head_dim, tie_word_embeddings=s.tied)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("shape", capacity.SHAPES, ids=lambda s: s.name)
def test_shape_parameters_equal_the_models(shape):
    """P, the root and a block, as the formulas count them, equal the parameters of the model of that shape."""
    model = _llama(shape)
    assert shape.params == _count(model)
    assert shape.block == _count(model.model.layers[0])
    root = _count(model.model.embed_tokens) + _count(model.model.norm) + (0 if shape.tied else _count(model.lm_head))
    assert shape.root == root


def test_family_at_4096_is_llama_3_1_8b():
    """The one-parameter family passes through the published 8,030,261,248 of Llama-3.1-8B."""
    assert capacity.family(4096).params == 8_030_261_248
    assert _count(_llama(capacity.family(4096))) == 8_030_261_248


def test_tensor_parallel_parameters_split_every_matrix():
    """A TP rank holds each matrix / N (the vocabulary by ceil(V / N) rows) and every norm whole: summed over the
    N ranks, P plus the norms N - 1 more times plus the vocabulary's padding rows. Both sides are float sums of
    integers below 2^53 over the shape's 9 matrices and its norms: at most 40 operations, each one rounding of
    the running total, so they agree to 40 units of double roundoff."""
    s = next(x for x in capacity.SHAPES if x.name == "Llama-3.1-8B")
    for n in (1, 2, 4, 8):
        pad = (-s.vocab) % n * s.d * 2  # embedding and head
        bound = 40 * 2.0 ** -53
        assert n * capacity.tp_local_params(s, n) == pytest.approx(s.params + (n - 1) * s.norms + pad, rel=bound)


def test_bench_student_elements_are_the_bench_models():
    """The check's formula side for scripts.bench.train.sharded: its student and projectors' elements, in all
    and per rank at N = 2 (FSDP2 pads dim 0 to a multiple of N), against the real modules."""
    from scripts.bench.train import sharded

    for config in (sharded.STUDENT, sharded.SMOKE_STUDENT):
        s = capacity.Shape("bench", config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"],
                           capacity.SMOLLM2_VOCAB, config["num_attention_heads"], config["num_key_value_heads"],
                           config["head_dim"], config["tie_word_embeddings"])
        model = _llama(s)
        projectors = [torch.nn.Linear(int(s.d), sharded.TEACHER["hidden_size"], bias=False, device="meta")
                      for _ in range(2)]
        params = [p for m in (model, *projectors) for p in m.parameters()]
        local, total = capacity.bench_student_elements(_count(model), 2)
        assert total == sum(p.numel() for p in params)
        assert local == sum(-(-p.shape[0] // 2) * p[0].numel() for p in params)
    assert capacity.bench_student_elements(12345, 2) is None


def test_tables_print_and_say_what_is_unmeasured(tmp_path, capsys):
    capacity.main(["--measured", str(tmp_path / "none.jsonl")])
    out = capsys.readouterr().out
    assert "| 80 GB |" in out and "Llama-3.1-70B, 8 x 80 GB" in out
    assert out.count("not measured") == 2
