"""Packing, padding, BOS/EOS placement, the held-out split, and corpus sources."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import SourceConfig
from pipeline.data.sequences import build_sequences
from pipeline.errors import PipelineError
from pipeline.sources.corpus import iter_documents, mix_documents


def _docs(n=60):
    return [f"document {i} " + "alpha beta gamma delta " * (3 + i % 7) for i in range(n)]


def test_packing_joins_with_eos_and_starts_with_bos(smollm_tokenizer):
    tok = smollm_tokenizer
    docs = _docs()
    s = build_sequences(docs, tok, seq_len=32, num_sequences=10, heldout_fraction=0.0, packing=True, seed=0)
    assert s.input_ids.shape == (10, 32) and s.lengths is None and s.n_train == 10
    assert (s.input_ids[:, 0] == tok.bos_token_id).all()
    # the body of the blocks is exactly the EOS-joined token stream, in order
    stream = []
    for d in docs:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert np.array_equal(s.input_ids[:, 1:].reshape(-1), np.array(stream[: 10 * 31]))


def test_padding_mode_lengths(smollm_tokenizer):
    tok = smollm_tokenizer
    s = build_sequences(_docs(), tok, seq_len=16, num_sequences=8, heldout_fraction=0.0, packing=False, seed=0)
    for row, n in zip(s.input_ids, s.lengths):
        assert row[0] == tok.bos_token_id
        assert (row[n:] == tok.pad_token_id).all()
    assert s.lengths.max() == 16  # long documents are truncated


def test_heldout_split_deterministic_and_disjoint(smollm_tokenizer):
    tok = smollm_tokenizer
    docs = [f"unique{i} " * 40 for i in range(200)]
    a = build_sequences(docs, tok, seq_len=32, num_sequences=40, heldout_fraction=0.25, packing=True, seed=3)
    b = build_sequences(docs, tok, seq_len=32, num_sequences=40, heldout_fraction=0.25, packing=True, seed=3)
    c = build_sequences(docs, tok, seq_len=32, num_sequences=40, heldout_fraction=0.25, packing=True, seed=4)
    assert a.digest() == b.digest() and a.digest() != c.digest()
    assert a.n_train == 30 and a.n_heldout == 10
    train_words = set(tok.decode(a.input_ids[: a.n_train].reshape(-1)).split())
    held_words = set(tok.decode(a.input_ids[a.n_train :].reshape(-1)).split())
    shared = {w for w in train_words & held_words if w.startswith("unique")}
    assert not shared  # no document straddles the split


def test_budget_and_empty_errors(smollm_tokenizer):
    with pytest.raises(PipelineError, match="corpus is empty"):
        build_sequences([], smollm_tokenizer, 32, 4, 0.0, True, 0)
    with pytest.raises(PipelineError, match="lower data.num_sequences"):
        build_sequences(["tiny text"], smollm_tokenizer, 32, 4, 0.0, True, 0)
    with pytest.raises(PipelineError, match="seq_len"):
        build_sequences(["tiny text"], smollm_tokenizer, 1, 4, 0.0, True, 0)


def test_local_formats(tmp_path):
    recs = [{"text": f"doc {i}", "other": i} for i in range(5)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    (tmp_path / "a.json").write_text(json.dumps(recs))
    pq.write_table(pa.table({"body": [r["text"] for r in recs]}), tmp_path / "a.parquet")
    (tmp_path / "a.txt").write_text("\n\n".join(r["text"] for r in recs) + "\n\n\n")
    want = sorted(r["text"] for r in recs)
    for name, field in (("a.jsonl", None), ("a.json", None), ("a.parquet", "body"), ("a.txt", None)):
        got = list(iter_documents(SourceConfig(path=str(tmp_path / name), text_field=field), "text", seed=0))
        assert sorted(got) == want, name
    with pytest.raises(PipelineError, match="no text field 'body'"):
        list(iter_documents(SourceConfig(path=str(tmp_path / "a.jsonl")), "body", seed=0))


@pytest.mark.parametrize("name,data,offset,line", [
    ("latin1.txt", "first doc\n\ncafé au lait".encode("latin-1"), 14, 3),
    ("latin1.jsonl", ('{"text": "ok"}\r\n{"text": "café"}\n').encode("latin-1"), 29, 2),
    ("latin1.json", '[{"text": "ok"}, {"text": "Ærø"}]'.encode("latin-1"), 27, 1),
])
def test_a_corpus_that_is_not_utf8_names_file_byte_and_encoding(tmp_path, name, data, offset, line):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(PipelineError) as e:
        list(iter_documents(SourceConfig(path=str(path)), "text", seed=0))
    byte = data[offset]
    assert str(e.value).startswith(f"{path}: not UTF-8 text at byte {offset} (line {line}: 0x{byte:02x}, ")
    assert "read as UTF-8" in str(e.value) and "\n" not in str(e.value)
    # the same bytes as UTF-8 read as before: \r\n and a lone \r end lines, as text mode had them
    path.write_bytes(data.decode("latin-1").replace("\n\n", "\r\n\r\n").encode())
    assert sorted(iter_documents(SourceConfig(path=str(path)), "text", seed=0))


def test_a_corpus_that_is_not_utf8_stops_a_build_in_one_line(tiny_config, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    bad = tmp_path / "notes.txt"
    bad.write_bytes(b"plain start\n\n" + "naïve".encode("cp1252"))
    cfg_path, cache_dir = tiny_config(data__sources=[{"path": str(bad)}])
    r = CliRunner().invoke(main, ["cache", "build", str(cfg_path)])
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert r.output.startswith(f"error: {bad}: not UTF-8 text at byte 15 (line 3: 0xef, invalid continuation byte)")
    assert not cache_dir.exists()


def test_a_txt_corpus_keeps_text_mode_newlines(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes("one\r\n\r\ntwo\r\rthree\rline".encode())
    assert sorted(iter_documents(SourceConfig(path=str(path)), "text", seed=0)) == ["one", "three\nline", "two"]


def test_hub_code_path_on_local_dataset(tmp_path):
    """The hub loader (datasets) on local data: a save_to_disk folder and a data-files folder."""
    import datasets

    ds = datasets.Dataset.from_dict({"text": [f"saved {i}" for i in range(6)]})
    ds.save_to_disk(str(tmp_path / "saved"))
    got = list(iter_documents(SourceConfig(path=str(tmp_path / "saved")), "text", seed=0))
    assert sorted(got) == sorted(f"saved {i}" for i in range(6))


def test_packaged_corpus_and_mixing(tmp_path):
    wiki = iter_documents(SourceConfig(path="wiki-vital"), "text", seed=0)
    first = [next(wiki) for _ in range(3)]
    assert all(len(t) > 20 for t in first)
    (tmp_path / "b.txt").write_text("\n\n".join(f"local {i}" for i in range(400)))
    mixed = mix_documents([SourceConfig(path="wiki-vital", weight=3.0), SourceConfig(path=str(tmp_path / "b.txt"))],
                          "text", seed=1)
    take = [next(mixed) for _ in range(400)]
    local = sum(t.startswith("local ") for t in take)
    assert 70 <= local <= 130  # ~1/4 by weight
