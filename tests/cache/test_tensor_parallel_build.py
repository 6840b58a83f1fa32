"""A tensor-parallel teacher (teacher.tensor_parallel: 2, two gloo processes under torchrun) builds the cache a
single process builds, within the rounding of what is stored; bad tensor-parallel settings are refused in one
line before any weight loads.

Bounds come from the stored dtypes and the fp32 forward (tests/numerics.py: U = 2^-24), never from measured
errors. The TP forward sums its row-parallel outputs in another order than one process, so the fp32 logits and
block outputs differ by a few roundings; after rounding to the stored dtype two values that close differ by at
most one spacing of that dtype.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cache import open_cache
from pipeline.cli import main
from tests.numerics import U

REPO = Path(__file__).resolve().parents[2]
SAMPLES = 16


def _spacing(x: np.ndarray, dtype) -> np.ndarray:
    """One spacing of `dtype` (a numpy float type, or "bfloat16") at |x| (fp32)."""
    if dtype == "bfloat16":  # 8 significant bits: |x| in [2^(e-1), 2^e) has spacing 2^(e-8)
        _, e = np.frexp(np.abs(np.asarray(x, dtype=np.float32)))
        return np.ldexp(np.float32(1), e - 8).astype(np.float32)
    return np.spacing(np.abs(x).astype(dtype)).astype(np.float32)


def _forward_error(hidden: int, scale: float) -> float:
    """What two fp32 forwards of the same weights may differ by at a value of magnitude <= scale: ~sqrt(d) U
    per dot product of the sum of |terms|, the sum taken as a few times the largest value (head.capture_tolerance's
    fp32 term)."""
    return 16 * math.sqrt(hidden) * U * scale


def _topk_ties(ids_a, vals_a, ids_b, vals_b, tol) -> int:
    """Positions whose top-k ids differ (counted), after checking that every differing slot is a tie within
    `tol`: the id one build has at slot j has, in the other build, a value within tol of it (at its slot there,
    or at the last slot when the other build left it out of its top-k)."""
    exceptions = 0
    for t in np.nonzero((ids_a != ids_b).any(-1))[0]:
        exceptions += 1
        for j in np.nonzero(ids_a[t] != ids_b[t])[0]:
            where = np.nonzero(ids_b[t] == ids_a[t, j])[0]
            other = vals_b[t, where[0]] if len(where) else vals_b[t, -1]
            assert abs(vals_a[t, j] - other) <= tol[t].max(), (t, j, ids_a[t], ids_b[t], vals_a[t], vals_b[t])
    return exceptions


def test_tensor_parallel_build_equals_one_process(tiny_config, tmp_path):
    cfg_path, _ = tiny_config(data__num_sequences=16, cache__logits="topk+sampled+exact", cache__samples=SAMPLES)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = subprocess.run([sys.executable, "-m", "pipeline.cli", "cache", "build", str(cfg_path), "--set",
                         f"cache.dir={one}"], env=env, capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29500 + (os.getpid() + 500) % 1000), "-m", "pipeline.cli", "cache", "build", str(cfg_path),
           "--set", f"cache.dir={two}", "--set", "teacher.tensor_parallel=2"]
    r2 = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]

    a, b = open_cache(one), open_cache(two)
    ma, mb = dict(a.manifest), dict(b.manifest)
    assert ma.pop("build") == {"world": 1, "tensor_parallel": 1}
    assert mb.pop("build") == {"world": 2, "tensor_parallel": 2}
    assert ma["fingerprint"] == mb["fingerprint"]  # the same cache: a rebuild of either config finds it complete
    # the shards' checksums and the hidden states' mean squares follow the rounded values; the rest is the same
    assert {k: v for k, v in ma.items() if k not in ("shards", "hidden_mean_square")} == \
        {k: v for k, v in mb.items() if k not in ("shards", "hidden_mean_square")}
    head = ma["exact"]["file"]
    assert (one / head).read_bytes() == (two / head).read_bytes()  # the gathered head: the same bytes

    d = ma["teacher"]["hidden_size"]
    codecs = {int(k): v for k, v in ma["layer_codecs"].items()}
    ties = positions = moved = draws = 0
    worst = {"logit": 0.0, "lse": 0.0, "hidden": 0.0}  # max error / bound
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert np.array_equal(x["input_ids"], y["input_ids"])
        va, vb = x["topk_logits"], y["topk_logits"]
        positions += len(va)
        # stored fp16 logits: the fp32 logits differ by far less than a spacing, so the rounded ones by <= 1
        tol = np.maximum(_spacing(va, np.float16), _spacing(vb, np.float16))
        err = np.abs(va - vb)
        assert (err <= tol).all()
        worst["logit"] = max(worst["logit"], float((err / tol).max()))
        ties += _topk_ties(x["topk_ids"], va, y["topk_ids"], vb, tol)
        # lse' = logsumexp(stored / T) - log(1 - tau_T): 1-Lipschitz in the stored values (over T), the tail
        # through the fp32 logits' forward error (both sides), and its own fp32 rounding on each side
        fwd = _forward_error(d, float(np.abs(va).max()))
        for temp in x["lse"]:
            la, lb = x["lse"][temp], y["lse"][temp]
            bound = (err.max(-1) + 2 * fwd) / temp + 2 * _spacing(la, np.float32)
            assert (np.abs(la - lb) <= bound).all(), temp
            worst["lse"] = max(worst["lse"], float((np.abs(la - lb) / bound).max()))
        for layer, ha in x["hidden"].items():
            hb = y["hidden"][layer]
            scale = float(np.abs(ha).max())
            if codecs.get(layer, ma["hidden_codec"]) == "fp32":
                bound = np.full(ha.shape, _forward_error(d, scale) + 2 * _spacing(np.float32(scale), np.float32))
            else:  # bf16: one spacing of the stored values beyond the forward's difference
                bound = np.maximum(_spacing(ha, "bfloat16"), _spacing(hb, "bfloat16")) + _forward_error(d, scale)
            assert (np.abs(ha - hb) <= bound).all(), layer
            worst["hidden"] = max(worst["hidden"], float((np.abs(ha - hb) / bound).max()))
        # the draws: the same, but for a target within the rounding of the fp32 cumulative sums of a CDF value,
        # which moves that one draw to the neighbouring id (vocab_parallel.parallel_lookup)
        for t in range(len(va)):
            ca = Counter({int(k): int(c) for k, c in zip(x["sample_ids"][t], x["sample_counts"][t]) if c})
            cb = Counter({int(k): int(c) for k, c in zip(y["sample_ids"][t], y["sample_counts"][t]) if c})
            draws += SAMPLES
            if ca != cb:
                (ida,), (idb,) = list((ca - cb).elements()), list((cb - ca).elements())
                assert abs(ida - idb) == 1, (i, t, ca, cb)
                moved += 1
            la = dict(zip(x["sample_ids"][t].tolist(), x["sample_logits"][t]))
            lb = dict(zip(y["sample_ids"][t].tolist(), y["sample_logits"][t]))
            for k in (ca & cb):
                assert abs(la[k] - lb[k]) <= max(_spacing(la[k], np.float16), _spacing(lb[k], np.float16))
    print(f"TP=2 vs one process: top-k ties {ties} of {positions} positions, draws moved to a neighbour {moved} of "
          f"{draws}; max error / bound: {worst}")
    assert ties <= positions // 10 and moved <= draws // 100  # ties and near-CDF targets are rare on random logits


def _run(cfg_path, *extra):
    return CliRunner().invoke(main, ["cache", "build", str(cfg_path), *extra], catch_exceptions=False)


@pytest.fixture
def no_weights(monkeypatch):
    """Fail a test that loads a teacher's weights."""
    from pipeline import phase_one

    def refuse(*a, **k):
        raise AssertionError("the teacher's weights were loaded before teacher.tensor_parallel was checked")

    monkeypatch.setattr(phase_one.models, "load_weights", refuse)


@pytest.mark.parametrize("tp,message", [
    (3, "teacher.tensor_parallel: 3 does not divide the teacher's num_attention_heads (4)"),
    (2, "teacher.tensor_parallel: 2 needs a distributed launch"),
])
def test_bad_tensor_parallel_one_line_nothing_written(tiny_config, no_weights, tp, message):
    cfg_path, cache_dir = tiny_config(teacher__tensor_parallel=tp, data__num_sequences=8)
    r = _run(cfg_path)
    assert r.exit_code == 2 and r.output.startswith(f"error: {message}") and r.output.count("\n") == 1, r.output
    assert not cache_dir.exists()


def test_architecture_without_tp_plan_refused(tiny_config, no_weights, monkeypatch):
    from pipeline import phase_one

    load = phase_one.models.load_config

    def without_plan(*a, **k):
        config = load(*a, **k)
        config.base_model_tp_plan = None
        return config

    monkeypatch.setattr(phase_one.models, "load_config", without_plan)
    cfg_path, cache_dir = tiny_config(teacher__tensor_parallel=2, data__num_sequences=8)
    r = _run(cfg_path)
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert "needs a tensor-parallel plan, and transformers has none for the teacher's architecture (llama)" in r.output
    assert not cache_dir.exists()


def test_tensor_parallel_size_checked_against_world_and_kv_heads(tiny_teacher):
    from pipeline.errors import PipelineError
    from pipeline.phase_one import Ranks, check_tensor_parallel
    from pipeline.sources.models import load_config

    tcfg = load_config(str(tiny_teacher))  # 4 attention heads, 2 KV heads
    check_tensor_parallel(2, 4, tcfg)
    check_tensor_parallel(1, 3, tcfg)
    with pytest.raises(PipelineError, match=r"^teacher.tensor_parallel: 2 does not divide the 3 processes of this launch$"):
        check_tensor_parallel(2, 3, tcfg)
    with pytest.raises(PipelineError, match=r"^teacher.tensor_parallel: 4 does not divide the teacher's "
                                            r"num_key_value_heads \(2\)$"):
        check_tensor_parallel(4, 4, tcfg)
    # who does what in a world of 2 groups x 2: consecutive ranks share a teacher, the first of each writes
    layout = [(r.group, r.writes) for r in (Ranks(rank, 4, 2) for rank in range(4))]
    assert layout == [(0, True), (0, False), (1, True), (1, False)] and Ranks(3, 4, 2).groups == 2


def test_the_transformers_mesh_surfaces_the_multi_group_build_relies_on():
    """With several TP groups, models.tensor_parallel_mesh hands transformers a mesh it builds itself, through
    transformers' private mesh builder: an upgrade that moves or reshapes one of these fails here, loudly,
    rather than in a multi-group build."""
    import inspect

    from transformers.distributed import mixin, utils

    assert tuple(inspect.signature(mixin.initialize_distributed_mesh).parameters) == ("distributed_config",)
    assert tuple(inspect.signature(utils._bind_local_device).parameters) == ("device_type", "local_rank")
    assert tuple(inspect.signature(utils.TransformersDeviceMesh).parameters) == ("dense_mesh", "expert_mesh")
