"""A padded cache (data.packing=false: one short document per row, the cache stores lengths) trained end to
end with `distill train`: the first step's logged losses equal a float64 computation over the valid
positions only, from our own forward passes of teacher and student on the unpadded sequences."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from pipeline.cache import open_cache
from pipeline.config import load_config
from pipeline.recipes.cache import build_cache
from pipeline.recipes.train import run_train
from tests.train.conftest import SEQ_LEN, base_overrides, byte_tokenizer, save_model, tiny_llama

T = 2.0  # loss.temperature in base_overrides
WEIGHTS = {"loss_ce": 0.4, "loss_kl": 0.4, "loss_hidden": 0.2, "loss_fdd": 0.3}
LAYER_MAP = {1: 2, 2: 4}  # uniform, 2 student blocks under 4 teacher blocks


def _short_docs() -> str:
    """Documents of 3..23 bytes (rows of 5..25 tokens with BOS and EOS, under seq_len 32) and one longer than
    a row (truncated, a full row), separated by blank lines."""
    words = "tea moss river stone lamp owl fern kite dune salt".split()
    docs = [" ".join(words[(i + j) % len(words)] for j in range(1 + i % 5))[: 3 + (i * 5) % 25] for i in range(20)]
    docs[7] = "a long line that runs past the end of one row of tokens"
    return "\n\n".join(docs)


def _forward(model, ids: torch.Tensor, blocks) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """(logits [L, V], {j: output of block j (1-based) before the final norm [L, d]}) of one unpadded row."""
    got = {}
    hooks = [model.model.layers[j - 1].register_forward_hook(
        lambda m, a, o, j=j: got.__setitem__(j, (o[0] if isinstance(o, tuple) else o)[0])) for j in blocks]
    with torch.no_grad():
        logits = model(input_ids=ids[None], use_cache=False).logits[0]
    for h in hooks:
        h.remove()
    return logits, got


def _reference(teacher_dir, student_dir, rows) -> dict[str, float]:
    """The compound loss's parts in float64 over a batch of unpadded rows: CE and KL (T^2 included, full
    vocabulary: the cache keeps every logit) averaged over next-token positions 0..L-2, cosine and FDD
    averaged over tokens 0..L-1, over the whole batch."""
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).double().eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir).double().eval()
    sums = dict.fromkeys(["ce", "kl", "cos1", "cos2", "fdd"], 0.0)
    positions = tokens = 0
    for ids in rows:
        z, ht = _forward(teacher, ids, LAYER_MAP.values())  # [L, V], {t: [L, 32]}
        s, hs = _forward(student, ids, LAYER_MAP)  # [L, V], {j: [L, 32]}
        nxt = ids[1:]  # [L-1]
        sums["ce"] += float(-torch.log_softmax(s[:-1], -1).gather(1, nxt[:, None]).sum())
        log_p, log_q = torch.log_softmax(z[:-1] / T, -1), torch.log_softmax(s[:-1] / T, -1)
        sums["kl"] += float((log_p.exp() * (log_p - log_q)).sum()) * T * T
        for j, t in LAYER_MAP.items():
            sums[f"cos{j}"] += float((1 - torch.cosine_similarity(hs[j], ht[t], dim=-1)).sum())
        sums["fdd"] += float((1 - torch.cosine_similarity(hs[2] - hs[1], ht[4] - ht[2], dim=-1)).sum())
        positions += len(ids) - 1
        tokens += len(ids)
    parts = {"loss_ce": sums["ce"] / positions, "loss_kl": sums["kl"] / positions,
             "loss_hidden_L1": sums["cos1"] / tokens, "loss_hidden_L2": sums["cos2"] / tokens,
             "loss_fdd": sums["fdd"] / tokens}
    parts["loss_hidden"] = (parts["loss_hidden_L1"] + parts["loss_hidden_L2"]) / 2
    parts["loss"] = sum(w * parts[k] for k, w in WEIGHTS.items())
    return parts


def test_padded_cache_first_step_equals_float64_over_valid_positions(tmp_path, train_overrides):
    tok = byte_tokenizer()
    teacher = save_model(tiny_llama(4, 32, seed=0, init_range=0.2), tok, tmp_path / "teacher")
    student = save_model(tiny_llama(2, 32, seed=1), tok, tmp_path / "student")  # same width: identity projectors
    corpus = tmp_path / "short.txt"
    corpus.write_text(_short_docs())
    overrides = base_overrides(tmp_path, teacher, student, str(tmp_path / "cache")) + [
        f"data.sources=[{{path: {corpus}}}]", "data.packing=false", "loss.delta=0.3",
    ]
    build_cache(load_config(None, overrides))
    cache = open_cache(tmp_path / "cache")
    train = list(cache.indices("train"))
    lengths = [cache[i]["length"] for i in train]
    assert max(lengths) == SEQ_LEN and min(lengths) < SEQ_LEN // 2 and len(set(lengths)) > 4, lengths
    # every train row in the first (and only) batch: the step's means are over the whole split, in any order
    out = tmp_path / "run"
    run_train(load_config(None, overrides + train_overrides(out, per_device_train_batch_size=len(train))))
    state = json.loads((out / "trainer_state.json").read_text())
    got = next(h for h in state["log_history"] if "loss" in h)

    rows = [torch.from_numpy(cache[i]["input_ids"][: n]).long() for i, n in zip(train, lengths)]
    want = _reference(teacher, student, rows)
    assert want["loss_kl"] > 0.05 and want["loss_hidden"] > 0.05 and want["loss_fdd"] > 0.05  # not trivially ~0
    # the trainer computes in fp32 (forward, losses, the cache's fp32 logits and lse): measured relative
    # errors <= 2.2e-7 (KL; CE 2e-9, hidden and FDD <= 5e-8) against float64, i.e. ~2 fp32 ulps (2^-23);
    # allowed: 8 ulps
    rel = 8 * 2.0 ** -23
    for key, value in want.items():
        assert abs(got[key] - value) <= rel * abs(value), (key, got[key], value)

    # the padded tail would have shown: CE over every position of the padded rows differs by far more
    padded = torch.stack([torch.from_numpy(cache[i]["input_ids"]).long() for i in train])  # [B, 32]
    model = AutoModelForCausalLM.from_pretrained(student).double().eval()
    with torch.no_grad():
        logits = model(input_ids=padded, use_cache=False).logits[:, :-1]  # [B, 31, V]
    ce_all = float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), padded[:, 1:].reshape(-1)))
    assert abs(ce_all - want["loss_ce"]) > 1e3 * rel * want["loss_ce"]
