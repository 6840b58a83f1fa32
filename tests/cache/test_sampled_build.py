"""Caches of sampled teacher targets (cache.logits sampled | topk+sampled), on a tiny random teacher."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.cache import open_cache
from pipeline.config import load_config
from pipeline.data.sequences import sequences_from_config
from pipeline.sources.models import load_tokenizer

from tests.cache.test_build import run_cli

K = 16


def test_sampled_cache_round_trip(tiny_config, tiny_teacher):
    """Every valid position holds K draws: counts sum to K, distinct ids sorted by logit, and the stored logits
    are the teacher's own at those ids (an independent forward; fp32 storage). No top-k columns."""
    cfg_path, cache_dir = tiny_config(cache__logits="sampled", cache__samples=K, cache__logit_dtype="fp32",
                                      cache__proposal_temperature=2.0, data__num_sequences=10)
    r = run_cli("cache", "build", cfg_path)
    assert r.exit_code == 0, r.output
    c = open_cache(cache_dir)
    m = c.manifest
    assert m["topk"] == 0 and m["logits"] == "sampled"
    assert m["sampling"] == {"samples": K, "proposal_temperature": 2.0, "seed": 0, "count_dtype": "uint8"}
    assert m["fingerprint"]["sampling"] == {"samples": K, "proposal_temperature": 2.0, "seed": 0}
    cfg = load_config(cfg_path)
    seqs = sequences_from_config(cfg.data, load_tokenizer(str(tiny_teacher)))
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(seqs.input_ids).long()).logits.float().numpy()  # [n, T, V]
    distinct_total = 0
    for i in range(len(c)):
        s = c[i]
        assert "topk_ids" not in s and set(s["lse"]) == {1.0, 2.0}
        ids, counts, vals = s["sample_ids"], s["sample_counts"], s["sample_logits"]
        assert ids.shape == counts.shape == vals.shape == (cfg.data.seq_len, K)
        assert (counts.sum(-1) == K).all() and (counts >= 0).all()
        for t in range(cfg.data.seq_len):
            used = counts[t] > 0
            n = int(used.sum())
            assert used[:n].all()  # filled slots first, empty ones after
            assert len(set(ids[t, :n].tolist())) == n
            assert (np.diff(vals[t, :n]) <= 0).all()  # sorted by logit, descending
            distinct_total += n
        np.testing.assert_allclose(vals, np.take_along_axis(logits[i], ids, axis=-1), rtol=1e-6, atol=1e-5)
    # 16 draws at T = 2 from the tiny teacher's sharp head: several distinct ids per position, not all K
    assert 1.5 < distinct_total / (len(c) * cfg.data.seq_len) < K
    info = json.loads(run_cli("cache", "info", cache_dir, "--json").output)
    assert info["logits"] == "sampled" and info["sampling"]["samples"] == K
    assert run_cli("cache", "verify", cache_dir).exit_code == 0


def test_draws_follow_the_proposal(tiny_config):
    """With topk+sampled, each of a position's top-4 ids is drawn c times out of K with E[c / K] = p_Tp (exact
    from the cached lse): over all positions, the mean of c / K - p is within 5 standard errors of 0 (the
    per-position variance p (1 - p) / K is known), for each rank; and the draws' total is K everywhere."""
    Kd, Tp = 32, 2.0
    cfg_path, cache_dir = tiny_config(cache__logits="topk+sampled", cache__topk=4, cache__samples=Kd,
                                      cache__logit_dtype="fp32", cache__proposal_temperature=Tp, data__num_sequences=16)
    assert run_cli("cache", "build", cfg_path).exit_code == 0
    c = open_cache(cache_dir)
    diffs, variances = [], []
    for i in range(len(c)):
        s = c[i]
        p = np.exp(s["topk_logits"] / Tp - s["lse"][Tp][:, None])  # [T, 4]
        hits = s["sample_ids"][:, None, :] == s["topk_ids"][:, :, None]  # [T, 4, K]
        drawn = (hits * s["sample_counts"][:, None, :]).sum(-1)  # [T, 4] how often each top id was drawn
        diffs.append(drawn / Kd - p), variances.append(p * (1 - p) / Kd)
    d, v = np.concatenate(diffs), np.concatenate(variances)  # [positions, 4]
    z = d.sum(0) / np.sqrt(v.sum(0))
    assert (np.abs(z) < 5).all(), z
    assert d.shape[0] == len(c) * c.seq_len and v.sum(0).min() > 0


def test_same_seed_same_bytes_other_seed_other_draws(tiny_config, tmp_path):
    """The draws depend on (sample_seed, sequence index) only: two builds give byte-identical shards, and
    topk+sampled holds the same draws and the same top-k as the single-kind builds; another seed draws others."""
    cfg_path, _ = tiny_config(cache__logits="sampled", cache__samples=8, data__num_sequences=12)
    a, b, both, topk, other = (tmp_path / n for n in ("a", "b", "both", "topk", "other"))
    assert run_cli("cache", "build", cfg_path, "--set", f"cache.dir={a}").exit_code == 0
    assert run_cli("cache", "build", cfg_path, "--set", f"cache.dir={b}").exit_code == 0
    ma, mb = open_cache(a).manifest, open_cache(b).manifest
    assert [s["checksum"] for s in ma["shards"]] == [s["checksum"] for s in mb["shards"]]
    assert run_cli("cache", "build", cfg_path, "--set", f"cache.dir={both}", "--set", "cache.logits=topk+sampled").exit_code == 0
    assert run_cli("cache", "build", cfg_path, "--set", f"cache.dir={topk}", "--set", "cache.logits=topk").exit_code == 0
    assert run_cli("cache", "build", cfg_path, "--set", f"cache.dir={other}", "--set", "cache.sample_seed=1").exit_code == 0
    ca, cboth, ctopk, cother = (open_cache(x) for x in (a, both, topk, other))
    assert cboth.manifest["topk"] == 8 and cboth.manifest["sampling"]["samples"] == 8
    differ = 0
    for i in range(len(ca)):
        for key in ("sample_ids", "sample_counts", "sample_logits"):
            assert np.array_equal(ca[i][key], cboth[i][key])
        for key in ("topk_ids", "topk_logits"):
            assert np.array_equal(ctopk[i][key], cboth[i][key])
        differ += int((ca[i]["sample_counts"] != cother[i]["sample_counts"]).any(-1).sum())
    assert differ > 0.5 * len(ca) * ca.seq_len


def test_logit_targets_are_in_the_fingerprint(tiny_config):
    """cache.logits is content: a top-k cache is not complete for a config that also draws samples."""
    cfg_path, cache_dir = tiny_config(data__num_sequences=8)
    assert run_cli("cache", "build", cfg_path).exit_code == 0
    fp = open_cache(cache_dir).manifest["fingerprint"]
    assert fp["capture"]["logits"] == "topk" and "sampling" not in fp
    r = run_cli("cache", "build", cfg_path, "--set", "cache.logits=topk+sampled")
    assert r.exit_code == 2 and "--overwrite" in r.output


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"cache__logits": "sampled", "cache__samples": 0}, "cache.samples: 0 must be >= 1"),
        ({"cache__logits": "sampled", "cache__proposal_temperature": 0.0}, "cache.proposal_temperature: 0.0 must be > 0"),
        ({"cache__logits": "sampled", "cache__proposal_temperature": -1.0}, "cache.proposal_temperature: -1.0 must be > 0"),
        ({"cache__logits": "sampled", "cache__proposal_temperature": 1.5}, "must be one of cache.temperatures (1, 2)"),
        ({"cache__logits": "sample"}, "cache.logits: 'sample' is not one of topk, sampled, exact, topk+sampled, topk+exact, sampled+exact, topk+sampled+exact"),
    ],
)
def test_bad_sampling_input_one_line_no_cache(tiny_config, overrides, message):
    cfg_path, cache_dir = tiny_config(**overrides)
    r = run_cli("cache", "build", cfg_path)
    assert r.exit_code == 2, r.output
    assert message in r.output and r.output.startswith("error: ") and r.output.count("\n") == 1
    assert not cache_dir.exists()
