"""scripts/harness.py: result rows go to the JSON-lines file one line per result as each is added, tables render
as markdown, the suite's summary reads the rows back, a child run returns its function's result (or its error),
and the random-model builder is seeded."""

from __future__ import annotations

import json

import pytest

from scripts import harness
from scripts.bench import summary


def doubled(x: int, note: str = "") -> dict:
    """A child step for the round trip below (run in a fresh process by harness.run_child)."""
    print("noise on stdout before the result")
    return {"doubled": 2 * x, "note": note}


def failing() -> dict:
    raise RuntimeError("this child fails on purpose")


def test_rows_are_appended_one_line_each(tmp_path):
    out = tmp_path / "sub" / "rows.jsonl"
    results = harness.Results("demo", out)
    results.add({"kind": "header", "settings": {"k": 64}})
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"bench": "demo", "kind": "header", "settings": {"k": 64}}]  # on disk before the next result exists
    results.add({"case": "one", "value": 1.5, "headline": {"tok/s": 1234.5}})
    results.add({"case": "two", "error": "Boom: it broke\n"})
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == results.rows and len(rows) == 3 and rows[1]["bench"] == "demo"
    # a second run appends to the same file (a suite's benchmarks share one)
    harness.Results("other", out).add({"case": "three", "headline": {"s": 0.01234}})
    assert len(out.read_text().splitlines()) == 4

    table = summary.table(summary.rows_of([out, tmp_path / "missing.jsonl"]))
    assert table.splitlines() == [
        "| benchmark | case | measured |", "|---|---|---|",
        "| demo | one | tok/s 1,234 |",
        "| demo | two | failed: Boom: it broke |",
        "| other | three | s 0.0123 |"]


def test_table_header_and_row():
    assert harness.table_header("name", ">s", ">ratio").splitlines() == ["| name | s | ratio |", "|---|---:|---:|"]
    assert harness.table_row("kd", "0.500", 1.0) == "| kd | 0.500 | 1.0 |"
    assert [harness.number(v) for v in (None, 12345.6, 1.23456, 0.000123456, 7)] == ["n/a", "12,346", "1.23",
                                                                                        "0.000123", "7"]


def test_child_round_trip():
    r = harness.run_child("tests.scripts.test_harness", "doubled", {"x": 21, "note": "é"})
    assert r["doubled"] == 42 and r["note"] == "é" and r["child_s"] > 0
    failed = harness.run_child("tests.scripts.test_harness", "failing", {})
    assert failed["returncode"] == 1 and "this child fails on purpose" in failed["error"]
    missing = harness.run_child("tests.scripts.test_harness", "no_such_step", {})
    assert missing["returncode"] == 2 and "no_such_step" in missing["error"]


def test_random_model_is_seeded_and_filled():
    torch = pytest.importorskip("torch")
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    a, b = harness.random_model(config, seed=3), harness.random_model(config, seed=3)
    c = harness.random_model(config, seed=4, head_scale=20.0)
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), name
        assert (x == 1).all() if x.dim() == 1 else abs(float(x.detach().std()) - config.initializer_range) < 0.01
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert abs(float(c.lm_head.weight.detach().std()) - 20 * config.initializer_range) < 0.2  # tied: the embedding too
    logits = a(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()  # the rotary buffers were rebuilt
