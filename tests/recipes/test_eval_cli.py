"""`distill eval` held-out scoring against dense references, and its bad-input contract.

With a lossless cache (top-k = the whole vocabulary, fp32 logits) the cached bucket KL is the full KL, so the
cache path must equal a dense fp64 KL from the live teacher; perplexity must equal HF's own shifted loss.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from pipeline.cache import open_cache
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.recipes.evaluate import run_eval
from tests.train.conftest import tiny, tiny_factory  # noqa: F401  (fixtures: the lossless tiny cache, tiny models)


def _dense(teacher_dir, model_dir, ids: np.ndarray, lengths=None) -> tuple[float, float]:
    """(perplexity, KL(teacher || model)) in fp64 over valid next-token positions."""
    t = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    m = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    x = torch.from_numpy(ids).long()
    attn = None if lengths is None else (torch.arange(x.shape[1])[None] < torch.as_tensor(lengths)[:, None]).long()
    with torch.no_grad():
        lp_t = torch.log_softmax(t(input_ids=x, attention_mask=attn).logits[:, :-1].double(), -1)
        lp_m = torch.log_softmax(m(input_ids=x, attention_mask=attn).logits[:, :-1].double(), -1)
    valid = torch.ones_like(x[:, 1:], dtype=torch.bool) if attn is None else attn[:, 1:].bool()
    nll = -lp_m.gather(-1, x[:, 1:, None]).squeeze(-1)[valid].mean()
    kl = (lp_t.exp() * (lp_t - lp_m)).sum(-1)[valid].mean()
    return math.exp(nll.item()), kl.item()


def test_heldout_from_cache_equals_dense_reference(tiny, tmp_path):
    out = tmp_path / "eval" / "student.json"
    result = run_eval(tiny["student"], tasks="none", heldout=tiny["cache"], out=str(out), progress=False)
    cache = open_cache(tiny["cache"])
    held = np.stack([cache[i]["input_ids"] for i in cache.indices("heldout")])
    ppl, kl = _dense(tiny["teacher"], tiny["student"], held)
    h = result["heldout"]
    assert h["tokens"] == held.shape[0] * (held.shape[1] - 1)
    assert math.isclose(h["perplexity"], ppl, rel_tol=2e-5)
    assert kl > 0.05 and math.isclose(h["kl_to_teacher"], kl, rel_tol=1e-4)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["tasks"] == {} and result["limit"] is None
    # per held-out sequence (what paired differences use): each row's NLL and KL sums against the row alone
    per = h["per_sequence"]
    assert per["tokens"] == [held.shape[1] - 1] * held.shape[0]
    for i, row in enumerate(held):
        ppl_i, kl_i = _dense(tiny["teacher"], tiny["student"], row[None])
        assert math.isclose(per["nll"][i] / per["tokens"][i], math.log(ppl_i), rel_tol=2e-5)
        assert math.isclose(per["kl"][i] / per["tokens"][i], kl_i, rel_tol=1e-4)
    assert math.isclose(sum(per["kl"]) / h["tokens"], h["kl_to_teacher"], rel_tol=1e-6)
    # the teacher against its own cache: KL 0 up to fp32 rounding of the cached logits and lse
    own = run_eval(tiny["teacher"], tasks="none", heldout=tiny["cache"], progress=False)["heldout"]
    assert abs(own["kl_to_teacher"]) < 1e-5


def test_text_file_with_live_reference(tiny, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("the river carried old stories.\n\nkings and scholars measured the stars at night, "
                    "and the stars measured them back.")
    result = run_eval(tiny["student"], reference=tiny["teacher"], tasks="none", text=str(text), seq_len=16,
                      progress=False)
    from tests.train.conftest import byte_tokenizer

    tok = byte_tokenizer()
    ids = []
    for doc in ("the river carried old stories.", "kings and scholars measured the stars at night, "
                "and the stars measured them back."):
        ids += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n_full, rest = divmod(len(ids), 16)
    rows = [ids[i * 16:(i + 1) * 16] for i in range(n_full)] + [ids[n_full * 16:] + [tok.eos_token_id] * (16 - rest)]
    lengths = [16] * n_full + [rest]
    ppl, kl = _dense(tiny["teacher"], tiny["student"], np.array(rows), np.array(lengths))
    assert result["heldout"]["tokens"] == sum(n - 1 for n in lengths)
    assert math.isclose(result["heldout"]["perplexity"], ppl, rel_tol=2e-5)
    assert math.isclose(result["heldout"]["kl_to_teacher"], kl, rel_tol=1e-4)


@pytest.mark.parametrize("kwargs,message", [
    ({"tasks": "arc_easy,nope"}, "unknown benchmark task.* 'nope'; valid: arc_easy, "),
    ({"limit": 0}, "limit must be a positive whole number of items, got 0"),
    ({"tasks": "none", "heldout": "H", "text": "T"}, "--heldout and --text are exclusive"),
    ({"tasks": "none", "heldout": "H", "reference": "R"}, "--reference is for --text"),
    ({"tasks": "none"}, "nothing to evaluate"),
    ({"tasks": "none", "text": "missing.txt"}, "--text: file not found"),
])
def test_bad_arguments(tiny, tmp_path, kwargs, message):
    kwargs = {k: (tiny["cache"] if v == "H" else tiny["teacher"] if v == "R" else v) for k, v in kwargs.items()}
    if kwargs.get("text") == "T":
        (tmp_path / "t.txt").write_text("some text here")
        kwargs["text"] = str(tmp_path / "t.txt")
    with pytest.raises(PipelineError, match=message):
        run_eval(tiny["student"], out=str(tmp_path / "out" / "r.json"), progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_vocabulary_mismatch_one_line_nothing_written(tiny, tiny_factory, tmp_path):
    small = tiny_factory.model(tmp_path / "small", vocab=200)
    out = tmp_path / "out" / "r.json"
    result = CliRunner().invoke(main, ["eval", "--model", small, "--heldout", tiny["cache"], "--tasks", "none",
                                       "--out", str(out)])
    assert result.exit_code == 2
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: model ") and "vocabulary of 200" in last and "258" in last
    assert not out.parent.exists()
    unknown = CliRunner().invoke(main, ["eval", "--model", small, "--tasks", "arc_easyy"])
    assert unknown.exit_code == 2 and "arc_easy" in unknown.output.strip().splitlines()[-1]
