"""The chunked vocabulary loss inside a sharded student (FSDP2 on 2 CPU processes, gloo;
tests/losses/sharded_head_worker.py): its value and its gradients with respect to the hidden states and the
sharded output embedding, against the dense fp64 computation of the same fp32 inputs, within the fp32 rounding
bound derived for each case (tests/losses/rounding.py, as test_chunked.py checks the unsharded loss). And the
loss leaves the sharding to FSDP: it reads the head weight FSDP gathered for the forward, runs no collective of
its own, and the head's gradient arrives reduce-scattered, a shard of V / 2 rows per process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.losses.rounding import head_loss_bounds
from tests.losses.test_chunked import _grads, _reference, _within
from tests.train.conftest import VOCAB

REPO = Path(__file__).resolve().parents[2]
CHUNK = 8  # sharded_head_worker.CHUNK


def test_chunked_loss_sharded_matches_dense_fp64(tmp_path):
    out = tmp_path / "results.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "losses" / "sharded_head_worker.py"), str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = torch.load(out, weights_only=False)
    assert len(results) == 2
    for case in results:
        divergence, tail, alpha, beta, temperature = case["case"]
        assert case["weight_whole_in_loss"] and case["collectives_in_loss"] == 0
        assert case["grad_w_sharded"] and case["grad_w_local_rows"] == VOCAB // 2
        assert case["same_on_both"]
        h, w = case["h"], case["w"]
        targets, ids, tl, lse = case["targets"], case["ids"], case["topk_logits"], case["lse"]

        def reference(hh, ww):
            return _reference(hh, ww, targets, ids, tl, lse, divergence, tail, alpha, beta,
                              T=temperature)

        ref = _grads(reference, h.double(), w.double())
        got = (case["loss"], [case["ce"], case["kl"]], case["grad_h"], case["grad_w"])
        bounds = head_loss_bounds(h, w, targets, ids, tl, lse, divergence, {}, tail, alpha, beta, temperature,
                                  chunk=CHUNK)
        _within(got, ref, bounds)
        assert case["grad_h"].abs().max() > 0 and case["grad_w"].abs().max() > 0
