"""Self-distillation on the packaged SmolLM2 teacher: the student is the teacher's own folder, the cache is
lossless (k = vocab, fp32 logits and hidden states) and student block j learns from teacher block j for
every block 1..30. At the first step, before any update, every distillation term must vanish within fp32
rounding and the task loss must be the teacher's own next-token cross-entropy.

The cache/online parity test cannot see a hook or a layer map that is one block off: both paths share
that code, so the error cancels. Here the student's hooked block j is compared with what the cache
stored as teacher block t(j) = j, and the cached blocks are checked against transformers' own
`output_hidden_states`, so an off-by-one in the student hooks, the map or the capture hooks shows up as
a hidden/FDD loss many orders of magnitude above rounding (on this text consecutive SmolLM2 blocks
differ by an RMS of at least ~8e-3 of the block's RMS; one block off, the FDD term is ~0.95).

Rounding bounds (u = 2^-24, the fp32 unit roundoff):
- logits: both sides see bitwise the same logits z; the cache has log p_i = z_i/T - lse_T, the student
  log q_i = log_softmax(z/T)_i. They differ by the two fp32 log-sum-exps over V terms and the rounding of
  the subtraction: a few ulps of the log-scale L = |lse_T| + max_i |z_i| / T (measured up to ~6 u L per
  row here). So |KL| <= T^2 * 16 u * max_r L_r; the (k+1)-th tail bucket is ~0 on both sides and floored
  alike, so it adds nothing.
- CE: the trainer's fp32 log-softmax (same few ulps of L = |lse_1| + |z_y|) and fp32 mean over M rows
  (<= log2(M) u CE, CE <= L) against the float64 reference: |CE - CE_64| <= 16 u * max_r L_r.
- FDD: 1 - cos(x, x) in fp32 for d = 576 features: two d-term sums (norm, normalized dot), each with
  relative error <= gamma_d ~ d u, plus a few roundings: |FDD| <= (2 d + 4) u (worst case; typical ~u).
- hidden (mse): 0 when the forward computes bitwise what the teacher computed (it does on this CPU);
  allow an RMS difference of 2^-14 of the teacher's RMS for kernels that sum in another order (about
  10 bits lost to rounding propagated through up to 30 blocks), still 4 orders of magnitude (in mean
  square) below the smallest one-block shift. The cached blocks get the same bound against
  transformers' hidden states.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner

from pipeline.cache import open_cache
from pipeline.cli import main
from pipeline.sources import models

TEACHER = "smollm2-135m-instruct"
VOCAB = 49152
N_BLOCKS = 30
WIDTH = 576
SEQ_LEN = 32
TEMPERATURE = 2.0
U = 2.0**-24  # fp32 unit roundoff
LOG_ULPS = 16  # fp32 log-sum-exp over V terms: a few ulps of the log-scale, with room
HIDDEN_REL_RMS = 2.0**-14
LOSS = {"alpha": 0.3, "beta": 0.3, "gamma": 0.2, "delta": 0.2, "temperature": TEMPERATURE, "logits": "kl",
        "tail": "bucket", "hidden": "mse", "dynamics": "fdd"}


def _invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_teacher_distilled_into_itself_has_zero_distillation_loss(tmp_path):
    folder = models.resolve_model(TEACHER)  # the converted teacher: student and teacher are this one folder
    config = tmp_path / "self.yaml"
    config.write_text(yaml.safe_dump({
        "teacher": {"model": folder, "dtype": "float32"},
        "student": {"model": folder, "dtype": "float32"},
        "data": {"sources": [{"path": "wiki-vital"}], "seq_len": SEQ_LEN, "num_sequences": 4,
                 "heldout_fraction": 0.0, "packing": True, "seed": 0},
        "cache": {"dir": str(tmp_path / "cache"), "topk": VOCAB, "temperatures": [TEMPERATURE], "layers": "auto",
                  "logit_dtype": "fp32", "hidden_codec": "fp32", "batch_size": 4, "shard_sequences": 4,
                  "chunk_sequences": 4},
        # uniform with equal depths, stride 1: t(j) = round(j * 30 / 30) = j for every block 1..30
        "mapping": {"strategy": "uniform", "stride": 1, "projector": "identity"},
        "loss": LOSS,
        # learning rate 0 and one step: the logged components are those of the unchanged teacher
        "training": {"output_dir": str(tmp_path / "run"), "per_device_train_batch_size": 4, "learning_rate": 0.0,
                     "max_steps": 1, "warmup_steps": 0, "logging_steps": 1, "save_strategy": "no",
                     "eval_strategy": "no", "use_cpu": True, "seed": 0},
    }, sort_keys=False))

    _invoke("cache", "build", config)
    _invoke("train", config)

    run = tmp_path / "run"
    summary = json.loads((run / "run.json").read_text())
    assert summary["layer_map"] == {str(j): j for j in range(1, N_BLOCKS + 1)}
    kinds = json.loads((run / "projectors.json").read_text())["kinds"]
    assert kinds == {str(j): "identity" for j in range(1, N_BLOCKS + 1)}
    log = next(h for h in json.loads((run / "trainer_state.json").read_text())["log_history"] if "loss" in h)
    per_layer = {j: log[f"loss_hidden_L{j}"] for j in range(1, N_BLOCKS + 1)}

    # the cached targets: all 4 train rows, the one batch of the step
    cache = open_cache(tmp_path / "cache")
    m = cache.manifest
    assert m["layers"] == list(range(1, N_BLOCKS + 1)) and m["topk"] == VOCAB and m["teacher"]["vocab_size"] == VOCAB
    assert (m["logit_dtype"], m["hidden_codec"], m["packing"]) == ("fp32", "fp32", True)
    rows = [cache[i] for i in cache.indices("train")]
    assert len(rows) == 4
    ids = torch.from_numpy(np.stack([r["input_ids"] for r in rows])).long()  # [B, T]
    z = np.stack([r["topk_logits"] for r in rows]).astype(np.float64)  # [B, T, V] raw logits of every id
    lse = np.stack([r["lse"][TEMPERATURE] for r in rows]).astype(np.float64)  # [B, T]
    cached = {j: torch.from_numpy(np.stack([r["hidden"][j] for r in rows])) for j in range(1, N_BLOCKS + 1)}

    # an independent forward with plain transformers: the teacher's own next-token CE in float64, and its
    # hidden states (hidden_states[j] = output of block j for j < N; the last entry has the final norm)
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = teacher(input_ids=ids, output_hidden_states=True)
        normed_last = teacher.model.norm(cached[N_BLOCKS])
    logits = out.logits.double()[:, :-1]  # [B, T-1, V] valid next-token positions (packed rows: all but the last)
    targets = ids[:, 1:]  # [B, T-1]
    manual_ce = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1)).item()

    def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double() - b.double()).square().mean().sqrt() / b.double().square().mean().sqrt()).item()

    # the cache holds block outputs before the final norm, numbered as transformers numbers them: this
    # catches a capture hook and a student hook that are off by the same block (their losses cancel)
    off = {j: rel_rms(cached[j], out.hidden_states[j]) for j in range(1, N_BLOCKS)}
    off[N_BLOCKS] = rel_rms(normed_last, out.hidden_states[N_BLOCKS])
    assert max(off.values()) <= HIDDEN_REL_RMS, {j: v for j, v in off.items() if v > HIDDEN_REL_RMS}

    # KL = 0 within fp32 rounding of the log-scale
    valid = np.s_[:, :-1]
    log_scale_t = (np.abs(lse) + np.abs(z).max(-1) / TEMPERATURE)[valid].max()
    kl_bound = TEMPERATURE**2 * LOG_ULPS * U * log_scale_t
    assert abs(log["loss_kl"]) <= kl_bound, (log["loss_kl"], kl_bound)

    # hidden = 0 for every mapped block (mse against the teacher block of the same number)
    assert set(k for k in log if k.startswith("loss_hidden_L")) == {f"loss_hidden_L{j}" for j in range(1, N_BLOCKS + 1)}
    for j, value in per_layer.items():
        bound = HIDDEN_REL_RMS**2 * cached[j].double().square().mean().item()
        assert 0 <= value <= bound, (j, value, bound)
    assert 0 <= log["loss_hidden"] <= max(per_layer.values()) + U

    # FDD = 0: each step between consecutive blocks equals the teacher's
    fdd_bound = (2 * WIDTH + 4) * U
    assert abs(log["loss_fdd"]) <= fdd_bound, (log["loss_fdd"], fdd_bound)

    # CE = the teacher's own CE over the valid next-token positions
    lse_1 = torch.logsumexp(logits, dim=-1)  # [B, T-1] at T = 1
    z_y = logits.gather(-1, targets[..., None])[..., 0]  # [B, T-1]
    ce_bound = LOG_ULPS * U * (lse_1.abs() + z_y.abs()).max().item()
    assert abs(log["loss_ce"] - manual_ce) <= ce_bound, (log["loss_ce"], manual_ce, ce_bound)
    # the k = V tail bucket is ~0 on both sides: the backward pass stays finite
    assert math.isfinite(log["loss"]) and math.isfinite(log["grad_norm"]), log
