"""The Trainer's chunked vocabulary loss (loss.chunk_tokens > 0) on a real tiny student, tied and untied,
with padding: the loss and every parameter's gradient equal an independent dense fp64 computation."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from pipeline.config import load_config
from pipeline.losses.chunked import chunk_support
from pipeline.losses.spec import LossSpec
from pipeline.recipes.train import run_train
from pipeline.student.projectors import Projectors
from pipeline.train.trainer import UniversalDistillationTrainer
from tests.losses.rounding import head_loss_bounds
from tests.numerics import assert_within

V, TEMP, K = 97, 2.0, 6


def _student(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg)


def _batch():
    g = torch.Generator().manual_seed(1)
    B, T = 3, 12
    ids = torch.randint(0, V, (B, T), generator=g)
    length = torch.tensor([12, 7, 3])  # padded rows: positions >= length are padding
    ids[1, 7:] = 0
    ids[2, 3:] = 0
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3
    topk_logits, topk_ids = teacher.topk(K, dim=-1)
    return {"input_ids": ids, "length": length, "topk_ids": topk_ids, "topk_logits": topk_logits.float(),
            "lse": torch.logsumexp(teacher / TEMP, -1).float()}


def _reference_fp64(model: LlamaForCausalLM, batch: dict, alpha: float, beta: float) -> torch.Tensor:
    """Dense, fp64, from the definitions: CE and bucket KL(p || q) at T over valid next-token positions."""
    ids, length = batch["input_ids"], batch["length"]
    B, T = ids.shape
    attention = (torch.arange(T)[None, :] < length[:, None]).long()
    z = model(input_ids=ids, attention_mask=attention, use_cache=False).logits  # [B, T, V] fp64
    valid = torch.arange(T)[None, :] < (length[:, None] - 1)  # t has a next token
    z, nxt = z[valid], ids[:, 1:][valid[:, :-1]]
    return _loss_of_final_hidden(z, nxt, batch["topk_ids"][valid], batch["topk_logits"][valid], batch["lse"][valid],
                                 alpha, beta)


def _loss_of_final_hidden(z, nxt, topk_ids, topk_logits, lse, alpha: float, beta: float) -> torch.Tensor:
    """alpha CE + beta T^2 bucket KL(p || q), row means, from the logits z [M, V] of the valid positions (fp64)."""
    ce = -torch.log_softmax(z, -1).gather(-1, nxt[:, None]).mean()
    p_in = torch.exp(topk_logits.double() / TEMP - lse.double()[:, None])
    q_in = torch.softmax(z / TEMP, -1).gather(-1, topk_ids)
    p = torch.cat([p_in, 1 - p_in.sum(-1, keepdim=True)], -1)
    q = torch.cat([q_in, 1 - q_in.sum(-1, keepdim=True)], -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    return alpha * ce + beta * TEMP**2 * kl


def _trainer(model, tmp_path, chunk: int) -> UniversalDistillationTrainer:
    args = TrainingArguments(output_dir=str(tmp_path / f"t{chunk}"), use_cpu=True, report_to="none")
    spec = LossSpec(alpha=0.4, beta=0.6, gamma=0.0, temperature=TEMP, chunk_tokens=chunk)
    return UniversalDistillationTrainer(model=model, args=args, projectors=Projectors({}, {}, 24, 24, "xavier"), layer_map={},
                                        loss=spec)


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_and_gradients_match_dense_fp64(tied, tmp_path):
    student = _student(tied)
    assert chunk_support(student) == ""
    batch = _batch()
    reference = copy.deepcopy(student).double()
    ref_loss = _reference_fp64(reference, batch, 0.4, 0.6)
    ref_loss.backward()

    trainer = _trainer(student, tmp_path, chunk=5)  # 19 valid positions: chunks of 5, 5, 5, 4
    student.train()
    final = {}
    hook = student.model.norm.register_forward_hook(lambda m, a, out: final.__setitem__("h", out.detach()))
    loss, parts = trainer.distill_loss(student, batch)
    hook.remove()
    loss.backward()
    # the value: the fp64 loss of the final hidden states h this forward produced (so the blocks' own fp32
    # rounding is not part of it), within the derived rounding of the chunked head and vocabulary work
    ids, length = batch["input_ids"], batch["length"]
    valid = torch.arange(ids.shape[1])[None, :] < (length[:, None] - 1)
    h, targets = final["h"][valid], ids[:, 1:][valid[:, :-1]]  # [19, 24], [19]
    w = student.lm_head.weight.detach()
    args = (targets, batch["topk_ids"][valid], batch["topk_logits"][valid], batch["lse"][valid])
    exact = _loss_of_final_hidden(h.double() @ w.double().T, *args, 0.4, 0.6)
    bound = head_loss_bounds(h, w, *args, "kl", {}, "bucket", 0.4, 0.6, TEMP, chunk=5).loss
    assert_within("loss", loss.detach(), exact, bound)
    assert set(parts) == {"loss_ce", "loss_kl"}
    ref_params = dict(reference.named_parameters())
    for name, p in student.named_parameters():
        ref = ref_params[name].grad
        err = (p.grad.double() - ref).abs().max().item()
        # fp32 forward and backward through two blocks: a few ulps of the largest gradient entry
        assert err <= 3e-6 * ref.abs().max().item(), (name, err, ref.abs().max().item())  # measured <= 6.3e-7
    if tied:
        assert student.lm_head.weight is student.model.embed_tokens.weight


def test_dense_path_still_the_reference(tmp_path):
    """chunk_tokens 0 keeps the full-logits path; it agrees with the chunked one to fp32 rounding. Both run the
    same forward (bitwise the same final hidden states h), so they differ only in the head and vocabulary
    work, and each is within its derived rounding bound of the exact loss of h (tests/losses/rounding.py):
    the chunked one in chunks of 4 rows, the dense one over all rows at once."""
    batch = _batch()
    losses, final = {}, {}
    for chunk in (0, 4):
        student = _student(False)
        hook = student.model.norm.register_forward_hook(lambda m, a, out, c=chunk: final.__setitem__(c, out.detach()))
        trainer = _trainer(student, tmp_path, chunk)
        student.train()
        loss, _ = trainer.distill_loss(student, batch)
        hook.remove()
        losses[chunk] = float(loss.detach())
    assert torch.equal(final[0], final[4])
    ids, length = batch["input_ids"], batch["length"]
    valid = torch.arange(ids.shape[1])[None, :] < (length[:, None] - 1)  # t has a next token
    h, targets = final[0][valid], ids[:, 1:][valid[:, :-1]]  # [19, 24], [19]
    args = (h, student.lm_head.weight.detach(), targets, batch["topk_ids"][valid], batch["topk_logits"][valid],
            batch["lse"][valid], "kl", {}, "bucket", 0.4, 0.6, TEMP)
    bound = head_loss_bounds(*args, chunk=4).loss + head_loss_bounds(*args, chunk=h.shape[0]).loss
    assert_within("dense against chunked loss", losses[0], losses[4], bound)


def test_chunked_training_is_bitwise_deterministic(tiny, train_overrides):
    outs = []
    for run in ("a", "b"):
        out = tiny["root"] / f"chunked_{run}"
        run_train(load_config(None, tiny["overrides"] + train_overrides(out, max_steps=2) + ["loss.chunk_tokens=7"]))
        outs.append(out)
    wa, wb = (load_file(str(o / "student" / "model.safetensors")) for o in outs)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    la, lb = (json.loads((o / "trainer_state.json").read_text())["log_history"] for o in outs)
    assert [h.get("loss") for h in la] == [h.get("loss") for h in lb]


def test_ce_only_run_reads_no_logits(tiny, train_overrides):
    from pipeline.train.dataset import CacheDataset

    ds = CacheDataset(tiny["cache"], "train", [], 2.0, logits=False)
    assert set(ds[0]) == {"input_ids"}
    out = tiny["root"] / "ce_only"
    summary = run_train(load_config(None, tiny["overrides"] + train_overrides(out)
                                    + ["loss.alpha=1", "loss.beta=0", "loss.gamma=0"]))
    log = next(h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h)
    assert summary["metrics"]["global_step"] == 1 and "loss_kl" not in log and log["loss_ce"] == log["loss"]


def test_head_support_is_checked_numerically():
    import transformers

    assert chunk_support(_student(True)) == ""
    torch.manual_seed(0)
    gemma = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=16, final_logit_softcapping=3.0))
    with torch.no_grad():
        gemma.get_output_embeddings().weight.mul_(50.0)  # logits well past the cap: the softcap matters
    assert chunk_support(gemma) == ""  # reproduced: cap * tanh(z / cap)
    odd = _student(False)
    odd.config.logit_scale = 0.5  # a transform the config names but this architecture never applies
    why = chunk_support(odd)
    assert why.startswith("head logits differ from the model's by"), why


def test_unreproducible_head_trains_dense_with_a_note(tiny, train_overrides, tmp_path, capsys):
    student = tmp_path / "odd"
    shutil.copytree(tiny["student"], student)
    config = json.loads((student / "config.json").read_text())
    config["logit_scale"] = 0.5
    (student / "config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    run_train(load_config(None, tiny["overrides"] + train_overrides(out) + [f"student.model={student}"]))
    err = capsys.readouterr().err
    assert "note: loss.chunk_tokens: head logits differ" in err and "the vocabulary losses take the dense path" in err
    assert (out / "student" / "model.safetensors").is_file()


def test_bf16_run_computes_the_head_under_its_autocast(tiny, train_overrides, monkeypatch):
    """training.bf16: accelerate autocasts the model's forward only; the chunked head (outside it) must run
    under the same autocast, as a stock fine-tune's head does inside the forward, or its matmuls stay fp32."""
    import pipeline.train.trainer as trainer_module

    seen = []
    real = trainer_module.chunked_head_loss

    def spy(*a, **k):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real(*a, **k)

    monkeypatch.setattr(trainer_module, "chunked_head_loss", spy)
    out = tiny["root"] / "bf16"
    run_train(load_config(None, tiny["overrides"] + train_overrides(out, max_steps=1) + ["training.bf16=true"]))
    assert seen and all(s == (True, torch.bfloat16) for s in seen)
