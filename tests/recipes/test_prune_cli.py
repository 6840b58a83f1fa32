"""`distill prune` end to end: tiny models for the plumbing, the packaged SmolLM2 for the real claim."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.sources.models import load_tokenizer

PACKAGED = "smollm2-135m-instruct"


def _text_file(path) -> str:
    # plain prose, paragraphs separated by blank lines (the .txt corpus format)
    words = "the of a river mountain city people history science music art language water light".split()
    paras = [" ".join(words[(i * 7 + j) % len(words)] for j in range(120)) + "." for i in range(40)]
    path.write_text("\n\n".join(paras))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(PACKAGED)


def _tiny(folder, tokenizer, config) -> str:
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tokenizer) -> str:
    cfg = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return _tiny(tmp_path_factory.mktemp("tiny") / "llama", tokenizer, cfg)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return _text_file(tmp_path_factory.mktemp("corpus") / "calib.txt")


def _run(*args: str):
    return CliRunner().invoke(main, ["prune", *args], catch_exceptions=False)


SMALL = ("--calibration-sequences", "4", "--heldout-sequences", "2", "--seq-len", "32", "--batch-size", "2")


def test_depth_and_width_end_to_end(tiny_llama, corpus, tmp_path):
    out = tmp_path / "student"
    r = _run("--model", tiny_llama, "--out", str(out), "--calibration", corpus, "--remove", "1",
             "--hidden-size", "48", "--intermediate-size", "64", "--num-heads", "2", *SMALL)
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "pruning.json").read_text())
    assert len(rec["kept_layers"]) == 3 and len(rec["removed_layers"]) == 1
    assert sorted(rec["kept_layers"] + rec["removed_layers"]) == [1, 2, 3, 4]
    assert rec["method"] == "importance" and rec["width_importance"] == "activation"
    assert len(rec["kept_channels"]) == 48
    assert set(rec["kept_neurons"]) == {str(b) for b in rec["kept_layers"]}
    assert rec["sizes"]["new"] == {**rec["sizes"]["old"], "num_hidden_layers": 3, "hidden_size": 48,
                                   "intermediate_size": 64, "num_attention_heads": 2}
    assert rec["calibration"]["sequences"] == 4 and rec["calibration"]["tokens"] == 4 * 32
    assert rec["heldout"]["perplexity"] > 0
    model = tf.AutoModelForCausalLM.from_pretrained(out)  # a plain HF folder
    assert model.config.hidden_size == 48 and model.config.num_hidden_layers == 3
    assert not (tmp_path / "student.tmp").exists()


def test_refuses_non_empty_out_unless_overwrite(tiny_llama, corpus, tmp_path):
    out = tmp_path / "student"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ("--model", tiny_llama, "--out", str(out), "--calibration", corpus, "--method", "last", "--remove", "2",
            "--heldout-sequences", "0", *SMALL[:2], *SMALL[4:])
    r = _run(*args)
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    assert (out / "keep.txt").exists()
    r = _run(*args, "--overwrite")
    assert r.exit_code == 0, r.output
    assert not (out / "keep.txt").exists()
    assert json.loads((out / "pruning.json").read_text())["kept_layers"] == [1, 2]


@pytest.mark.parametrize(
    "args, message",
    [
        (("--remove", "4"), "cannot remove 4 of the model's 4 blocks"),
        (("--hidden-size", "128"), "--hidden-size 128: must be between 1 and the original 64"),
        (("--hidden-size", "50"), "hidden size (50) is not a multiple of the number of attention heads (4)"),
        (("--method", "random", "--remove", "1"), "unknown pruning method 'random'; valid: consecutive, importance, last"),
        (("--candidates", "importance:1,shuffle:1"), "unknown pruning method 'shuffle'"),
        (("--remove", "1", "--width-importance", "fisher"), "unknown width importance 'fisher'"),
        (("--calibration", "missing.jsonl", "--remove", "1"), "corpus file not found"),
        ((), "nothing to prune"),
    ],
)
def test_bad_input_one_line_error_nothing_written(tiny_llama, corpus, tmp_path, args, message):
    out = tmp_path / "student"
    base = ["--model", tiny_llama, "--out", str(out), *SMALL]
    if "--calibration" not in args:
        base += ["--calibration", corpus]
    r = _run(*base, *args)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert not out.exists() and not (tmp_path / "student.tmp").exists()


def test_unsupported_architecture(tokenizer, corpus, tmp_path):
    cfg = tf.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2)
    src = _tiny(tmp_path / "gpt2", tokenizer, cfg)
    r = _run("--model", src, "--out", str(tmp_path / "out"), "--remove", "1", "--calibration", corpus, *SMALL)
    assert r.exit_code == 2
    assert r.stderr.strip() == (
        "error: pruning does not support model type 'gpt2'; supported: gemma3_text, llama, mistral, qwen2, qwen3"
    )
    assert not (tmp_path / "out").exists()


def test_packaged_smollm2_importance_beats_last(tmp_path):
    """The real claim, on the packaged teacher with a few calibration sequences (docs/pruning.md, "Measured")."""
    out = tmp_path / "student"
    r = _run("--model", PACKAGED, "--out", str(out), "--candidates", "importance:6,last:6",
             "--calibration-sequences", "8", "--heldout-sequences", "4", "--seq-len", "128")
    assert r.exit_code == 0, r.output
    assert "candidate" in r.stdout and "importance:6" in r.stdout and "last:6" in r.stdout
    table = json.loads((out / "candidates.json").read_text())
    rows = {row["name"]: row for row in table["rows"]}
    unpruned, imp, last = rows["unpruned"], rows["importance:6"], rows["last:6"]
    assert 10 < unpruned["perplexity"] < 40
    assert imp["perplexity"] < 4 * unpruned["perplexity"]
    assert last["perplexity"] > 100 * imp["perplexity"]  # a wide margin: ~1e6 vs ~40 measured
    assert imp["kl"] < last["kl"] / 5
    assert table["best"] == "importance:6"
    rec = json.loads((out / "pruning.json").read_text())
    assert rec["candidate"] == "importance:6" and len(rec["kept_layers"]) == 24
    assert rec["removed_layers"] == imp["removed_layers"]
    assert all(2 <= b <= 29 for b in rec["removed_layers"])  # the first and last blocks matter most
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 24
