"""Config schema: YAML sections, --set overrides, one-line errors naming the key."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.errors import PipelineError


def test_demo_config_and_overrides():
    cfg = load_config("configs/demo.yaml", ["cache.topk=32", "cache.layers=[1, 2]", "mapping.strategy={1: 3}",
                                            "training.learning_rate=1e-4", "loss.temperature=1"])
    assert cfg.cache.topk == 32 and cfg.cache.layers == [1, 2]
    assert cfg.mapping.strategy == {1: 3}
    assert cfg.training["learning_rate"] == 1e-4
    assert cfg.loss.temperature == 1.0 and isinstance(cfg.loss.temperature, float)


def test_reference_config_lists_valid_keys():
    cfg = load_config("configs/reference.yaml")
    assert cfg.cache.dir and cfg.data.sources[0].path == "wiki-vital"


@pytest.mark.parametrize(
    "override,message",
    [
        ("cache.topkk=3", "unknown key cache.topkk; allowed in cache:"),
        ("nosection.x=1", "unknown key nosection"),
        ("cache.topk=many", "cache.topk: expected int"),
        ("cache.topk=0", "cache.topk: 0 must be >= 1"),
        ("data.seq_len=1", "data.seq_len: 1 must be >= 2"),
        ("loss.tail=sideways", "loss.tail: 'sideways' is not one of bucket, renormalize"),
        ("cache.temperatures=[1.0, -2]", "cache.temperatures[1]"),
        ("loss.temperature=0", "loss.temperature: 0.0 must be > 0"),
        ("data.packing=maybe", "data.packing: expected bool"),
        ("cache.layers=some", "cache.layers"),
        ("cache", "expected section.key=value"),
        ("data.sources=[{path: a.txt, wait: 2}]", "unknown key data.sources[0].wait"),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(PipelineError) as e:
        load_config("configs/demo.yaml", [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_file():
    with pytest.raises(PipelineError, match="config file not found"):
        load_config("nope.yaml")
