"""Projectors: kinds, inits, save/load round trip, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.student.projectors import build_projectors, load_projectors, save_projectors

PAIRS = {3: 6, 1: 2, 2: 4}


def test_linear_shapes_and_keys():
    proj = build_projectors(PAIRS, d_student=8, d_teacher=12, seed=0)
    assert list(proj.keys()) == ["1", "2", "3"]
    for module in proj.values():
        assert isinstance(module, nn.Linear) and module.bias is None
        assert tuple(module.weight.shape) == (12, 8)
    x = torch.randn(5, 8)
    assert proj["2"](x).shape == (5, 12)


def test_auto_picks_identity_when_widths_match():
    proj = build_projectors(PAIRS, 16, 16)
    assert all(isinstance(m, nn.Identity) for m in proj.values())
    assert list(proj.parameters()) == []
    assert all(isinstance(m, nn.Linear) for m in build_projectors(PAIRS, 16, 16, kind="linear").values())


@pytest.mark.parametrize("d_student,d_teacher", [(4, 7), (7, 4), (5, 5)])
def test_identity_init_pads_or_truncates(d_student, d_teacher):
    proj = build_projectors({1: 1}, d_student, d_teacher, kind="linear", init="identity")
    x = torch.randn(3, d_student)
    want = torch.zeros(3, d_teacher)
    m = min(d_student, d_teacher)
    want[:, :m] = x[:, :m]
    assert torch.equal(proj["1"](x), want)


def test_zero_and_xavier_inits():
    zero = build_projectors({1: 1}, 6, 10, init="zero")
    assert (zero["1"].weight == 0).all()

    bound = 0.1 * math.sqrt(6.0 / (6 + 10))  # xavier_uniform bound with gain 0.1
    state = torch.random.get_rng_state()
    a = build_projectors(PAIRS, 6, 10, init="xavier", seed=123)
    assert torch.equal(torch.random.get_rng_state(), state)  # a seed leaves the global RNG alone
    b = build_projectors(PAIRS, 6, 10, init="xavier", seed=123)
    for key in a:
        w = a[key].weight
        assert w.abs().max() <= bound and w.std() > bound / 4
        assert torch.equal(w, b[key].weight)
    assert not torch.equal(a["1"].weight, a["2"].weight)


def test_save_load_round_trip(tmp_path):
    proj = build_projectors(PAIRS, 6, 10, seed=1)
    with torch.no_grad():
        proj["2"].weight.add_(1.5)  # "trained"
    save_projectors(proj, tmp_path / "out", meta={"step": 42, "student": "x"})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["projectors.json", "projectors.safetensors"]
    index = json.loads((tmp_path / "out" / "projectors.json").read_text())
    assert index["d_student"] == 6 and index["d_teacher"] == 10 and index["init"] == "xavier"
    assert index["layer_pairs"] == {"1": 2, "2": 4, "3": 6}
    assert index["kinds"] == {"1": "linear", "2": "linear", "3": "linear"}
    assert index["meta"] == {"step": 42, "student": "x"}

    loaded = load_projectors(tmp_path / "out")
    assert list(loaded.keys()) == list(proj.keys())
    assert loaded.layer_pairs == {1: 2, 2: 4, 3: 6} and loaded.meta["step"] == 42
    for key in proj:
        assert torch.equal(loaded[key].weight, proj[key].weight)
    x = torch.randn(2, 6)
    assert torch.equal(loaded["3"](x), proj["3"](x))


def test_save_load_identity_and_bf16(tmp_path):
    ident = build_projectors({4: 8}, 5, 5)
    save_projectors(ident, tmp_path / "ident", meta={})
    loaded = load_projectors(tmp_path / "ident")
    assert isinstance(loaded["4"], nn.Identity) and loaded.layer_pairs == {4: 8}

    half = build_projectors({1: 1}, 3, 4, seed=0).to(torch.bfloat16)
    save_projectors(half, tmp_path / "half", meta={})
    back = load_projectors(tmp_path / "half")
    assert back["1"].weight.dtype == torch.bfloat16 and torch.equal(back["1"].weight, half["1"].weight)


def test_errors(tmp_path):
    with pytest.raises(PipelineError, match="auto, identity, linear"):
        build_projectors(PAIRS, 4, 4, kind="mlp")
    with pytest.raises(PipelineError, match="identity, xavier, zero"):
        build_projectors(PAIRS, 4, 8, init="orthogonal")
    with pytest.raises(PipelineError, match="equal widths"):
        build_projectors(PAIRS, 4, 8, kind="identity")
    with pytest.raises(PipelineError):
        build_projectors({}, 4, 8)
    with pytest.raises(PipelineError):
        build_projectors({-1: 2}, 4, 8)
    with pytest.raises(PipelineError):
        build_projectors(PAIRS, 0, 8)
    with pytest.raises(PipelineError, match="projectors.json"):
        load_projectors(tmp_path / "missing")

    save_projectors(build_projectors(PAIRS, 4, 8), tmp_path / "p", meta={})
    (tmp_path / "p" / "projectors.safetensors").unlink()
    with pytest.raises(PipelineError, match="projectors.safetensors"):
        load_projectors(tmp_path / "p")
