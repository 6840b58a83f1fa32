"""Layer maps: student block j -> teacher block t(j), both 1-based (docs/architecture.md, section 2, layer numbering).

Every expected map below is worked out by hand from the documented formulas:
  uniform  t(j) = round(j * N_t / N_s), halves rounded up, and never below block 1
  last     t(j) = j + (N_t - N_s)
  selected t(j) = kept_layers[j - 1] (the original 1-based indices pruning kept, in order)
  stride s keeps the student blocks j with (N_s - j) % s == 0: every s-th block counted down from the last.
"""

from __future__ import annotations

import json
import re

import pytest

from pipeline.errors import PipelineError
from pipeline.student.layer_map import LAYER_MAPS, build_layer_map, read_kept_layers

# the demo's student: SmolLM2's 30 blocks minus blocks 12..17 (1-based)
KEPT_24 = [*range(1, 12), *range(18, 31)]


def test_registered_strategies():
    assert LAYER_MAPS.names() == ["last", "selected", "uniform"]


@pytest.mark.parametrize("n_student,n_teacher,want", [
    # 8/3 = 2.67 -> 3, 16/3 = 5.33 -> 5, 24/3 = 8
    (3, 8, {1: 3, 2: 5, 3: 8}),
    # 7/5 = 1.4 -> 1, 2.8 -> 3, 4.2 -> 4, 5.6 -> 6, 7
    (5, 7, {1: 1, 2: 3, 3: 4, 4: 6, 5: 7}),
    # halves round up (Python's round() would give 2 and 4 here): 1.5 -> 2, 3, 4.5 -> 5, 6
    (4, 6, {1: 2, 2: 3, 3: 5, 4: 6}),
    # 2.5 -> 3, 5
    (2, 5, {1: 3, 2: 5}),
    (4, 4, {1: 1, 2: 2, 3: 3, 4: 4}),
    (1, 30, {1: 30}),
    # 24 of 30 blocks: 1.25 -> 1, 2.5 -> 3, 3.75 -> 4, 5, 6.25 -> 6, 7.5 -> 8, ...
    (24, 30, {1: 1, 2: 3, 3: 4, 4: 5, 5: 6, 6: 8, 7: 9, 8: 10, 9: 11, 10: 13, 11: 14, 12: 15, 13: 16, 14: 18,
              15: 19, 16: 20, 17: 21, 18: 23, 19: 24, 20: 25, 21: 26, 22: 28, 23: 29, 24: 30}),
    # a student deeper than the teacher: 0.4 -> 0 is the embedding output, not a block: block 1 instead
    (5, 2, {1: 1, 2: 1, 3: 1, 4: 2, 5: 2}),
])
def test_uniform(n_student, n_teacher, want):
    assert build_layer_map("uniform", n_student, n_teacher) == want


@pytest.mark.parametrize("n_student,n_teacher,want", [
    (3, 8, {1: 6, 2: 7, 3: 8}),
    (5, 7, {1: 3, 2: 4, 3: 5, 4: 6, 5: 7}),
    (4, 4, {1: 1, 2: 2, 3: 3, 4: 4}),
    (1, 30, {1: 30}),
])
def test_last(n_student, n_teacher, want):
    assert build_layer_map("last", n_student, n_teacher) == want


def test_selected_maps_to_the_kept_blocks():
    assert build_layer_map("selected", 3, 8, kept_layers=[2, 5, 8]) == {1: 2, 2: 5, 3: 8}
    assert build_layer_map("selected", 2, 4, kept_layers=[1, 4]) == {1: 1, 2: 4}
    full = build_layer_map("selected", 24, 30, kept_layers=KEPT_24)
    assert full == {**{j: j for j in range(1, 12)}, **{j: j + 6 for j in range(12, 25)}}


def test_explicit_map():
    assert build_layer_map({1: 2, 2: 5, 3: 8}, 3, 8) == {1: 2, 2: 5, 3: 8}
    # a subset of the student blocks, written out of order, with string keys/values as YAML may give them
    assert build_layer_map({"3": "8", "1": "0"}, 3, 8) == {1: 0, 3: 8}
    assert list(build_layer_map({3: 8, 1: 2}, 3, 8)) == [1, 3]  # sorted by student block
    # the embedding output (0) and the last teacher block are both valid targets
    assert build_layer_map({1: 0, 2: 8}, 2, 8) == {1: 0, 2: 8}


@pytest.mark.parametrize("strategy,n_student,n_teacher,stride,kept,want", [
    # stride 2 from the last of 5 blocks: 5, 3, 1 (uniform 5/7 above: 1 -> 1, 3 -> 4, 5 -> 7)
    ("uniform", 5, 7, 2, None, {1: 1, 3: 4, 5: 7}),
    # stride 2 of 4: 4, 2 (uniform 4/6: 2 -> 3, 4 -> 6)
    ("uniform", 4, 6, 2, None, {2: 3, 4: 6}),
    # stride 3 of 8 blocks: 8, 5, 2 (uniform 8/12: 2 -> 3, 5 -> 7.5 -> 8, 8 -> 12)
    ("uniform", 8, 12, 3, None, {2: 3, 5: 8, 8: 12}),
    # stride 6 of 24: 24, 18, 12, 6 (the demo's kind of student, docs/evaluation.md)
    ("uniform", 24, 30, 6, None, {6: 8, 12: 15, 18: 23, 24: 30}),
    ("last", 24, 30, 6, None, {6: 12, 12: 18, 18: 24, 24: 30}),
    ("selected", 24, 30, 6, KEPT_24, {6: 6, 12: 18, 18: 24, 24: 30}),
    ("last", 3, 8, 2, None, {1: 6, 3: 8}),
    # a stride beyond the depth keeps only the last block
    ("uniform", 3, 8, 5, None, {3: 8}),
    ("selected", 3, 8, 3, [2, 5, 8], {3: 8}),
    # an explicit map is thinned the same way: of blocks 1..4, stride 2 keeps 4 and 2
    ({1: 2, 2: 4, 3: 6, 4: 8}, 4, 8, 2, None, {2: 4, 4: 8}),
    # ... and blocks the explicit map does not name stay unmapped: of 1, 2, 3 (of 5), stride 2 keeps 1 and 3
    ({1: 1, 2: 2, 3: 3}, 5, 7, 2, None, {1: 1, 3: 3}),
])
def test_stride(strategy, n_student, n_teacher, stride, kept, want):
    assert build_layer_map(strategy, n_student, n_teacher, stride, kept) == want


def test_stride_one_keeps_every_block():
    assert build_layer_map("uniform", 3, 8, 1) == build_layer_map("uniform", 3, 8)


@pytest.mark.parametrize("args,message", [
    (("uniform", 0, 8), "positive depths"),
    (("uniform", 3, 0), "positive depths"),
    (("last", 9, 8), "no deeper than the teacher"),
    (("nearest", 3, 8), "unknown layer-map strategy 'nearest'; valid: last, selected, uniform"),
    (("uniform", 3, 8, 0), "mapping.stride: 0 must be >= 1"),
    (("uniform", 3, 8, -2), "mapping.stride: -2 must be >= 1"),
    (("selected", 3, 8), "needs a pruning.json"),
    (("selected", 3, 8, 1, [2, 8]), "lists 2 kept blocks but the student has 3"),
    (("selected", 3, 8, 1, [2, 5, 9]), "kept block 9 is outside 1..8"),
    # kept blocks are 1-based: a 0 means a 0-based record, which would shift every pair by one block
    (("selected", 3, 8, 1, [0, 4, 7]), "kept block 0 is outside 1..8"),
    (({0: 1}, 3, 8), "student layer 0 is outside 1..3"),
    (({4: 1}, 3, 8), "student layer 4 is outside 1..3"),
    (({1: 9}, 3, 8), "teacher layer 9 is outside 0..8"),
    (({1: -1}, 3, 8), "teacher layer -1 is outside 0..8"),
])
def test_errors(args, message):
    with pytest.raises(PipelineError, match=re.escape(message)):
        build_layer_map(*args)


def test_read_kept_layers(tmp_path):
    assert read_kept_layers(None) is None
    assert read_kept_layers(tmp_path) is None  # no pruning.json: the student was not pruned by us
    (tmp_path / "pruning.json").write_text(json.dumps({"removed_layers": [3]}))
    assert read_kept_layers(tmp_path) is None
    (tmp_path / "pruning.json").write_text(json.dumps({"kept_layers": ["1", 2, 4], "removed_layers": [3]}))
    assert read_kept_layers(tmp_path) == [1, 2, 4]
    assert build_layer_map("selected", 3, 4, kept_layers=read_kept_layers(tmp_path)) == {1: 1, 2: 2, 3: 4}
    (tmp_path / "pruning.json").write_text("{kept_layers: [1")
    with pytest.raises(PipelineError, match="pruning.json is not valid JSON"):
        read_kept_layers(tmp_path)
