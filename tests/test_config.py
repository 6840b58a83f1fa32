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
    import dataclasses

    import yaml

    from pipeline.losses.spec import LossSpec

    cfg = load_config("configs/reference.yaml")
    assert cfg.cache.dir and cfg.data.sources[0].path == "wiki-vital"
    loss_keys = set(yaml.safe_load(open("configs/reference.yaml"))["loss"])
    assert loss_keys == {f.name for f in dataclasses.fields(LossSpec)}
    assert cfg.loss.checked().logits_args == {}  # the reference's loss passes the recipe's checks


def test_reference_config_is_every_key_at_its_default():
    """configs/reference.yaml (the README's "every key with its default") against the dataclasses' own
    defaults and the train recipe's TrainingArguments defaults, section by section."""
    import dataclasses

    import yaml

    from pipeline.config import Config
    from pipeline.train.arguments import TRAINING_DEFAULTS

    ref = yaml.safe_load(open("configs/reference.yaml"))
    defaults = dataclasses.asdict(Config())
    training = ref.pop("training")
    assert defaults.pop("training") == {}
    assert set(ref) == set(defaults)
    for section, keys in ref.items():
        assert keys == defaults[section], section
    assert training == TRAINING_DEFAULTS


@pytest.mark.parametrize("path", ["configs/depth.yaml", "configs/width.yaml", "configs/depth_width.yaml"])
def test_example_configs_load(path):
    cfg = load_config(path)
    assert cfg.loss.preset == path.split("/")[1][: -len(".yaml")]
    assert cfg.loss.checked().describe()


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


# ---- loss presets and the skew spellings ------------------------------------------------------------


@pytest.mark.parametrize("preset,weights", [
    ("depth", (0.5, 0.5, 0.1, 0.0)), ("width", (0.4, 0.4, 0.2, 0.0)), ("depth_width", (0.4, 0.4, 0.2, 0.0)),
    ("advanced", (0.2, 0.5, 0.1, 0.2)),
])
def test_loss_presets(preset, weights):
    loss = load_config(None, [f"loss.preset={preset}", "loss.temperature=1"]).loss
    assert (loss.alpha, loss.beta, loss.gamma, loss.delta) == weights
    assert loss.temperature == 1.0 and loss.preset == preset  # T stays as configured
    if preset == "advanced":
        assert (loss.logits, loss.logits_args, loss.hidden, loss.dynamics) == ("skew_kl", {"lambda": 0.5}, "cosine", "fdd")
    else:
        assert (loss.logits, loss.logits_args, loss.hidden) == ("kl", {}, "cosine")


def test_explicit_keys_override_the_preset(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("loss:\n  preset: advanced\n  gamma: 0.0\n")
    loss = load_config(config, ["loss.alpha=0.3"]).loss
    assert (loss.alpha, loss.beta, loss.gamma, loss.delta) == (0.3, 0.5, 0.0, 0.2)
    assert loss.temperature == 2.0 and loss.logits_args == {"lambda": 0.5}
    # choosing the divergence drops the preset's parameters with it
    assert load_config(config, ["loss.logits=kl"]).loss.logits_args == {}
    assert load_config(config, ["loss.logits=gjsd", "loss.logits_args={beta: 0.2}"]).loss.logits_args == {"beta": 0.2}
    skewed = load_config(config, ["loss.skew_alpha=0.3"]).loss  # the book's s = 1 - lambda
    assert skewed.logits == "skew_kl" and skewed.logits_args == {"lambda": 0.7}
    # a resolved config reloads to itself (run.json, ablation children)
    from pipeline.config import config_from_dict

    cfg = load_config(config, ["loss.skew_lambda=0.25"])
    assert config_from_dict(cfg.to_dict()) == cfg


def test_skew_spellings():
    assert load_config(None, ["loss.skew_lambda=0"]).loss.logits_args == {"lambda": 0.0}
    assert load_config(None, ["loss.skew_alpha=1"]).loss.logits_args == {"lambda": 0.0}
    loss = load_config(None, ["loss.skew_alpha=0.25"]).loss
    assert loss.logits_args == {"lambda": 0.75} and loss.skew_alpha is None and loss.skew_lambda is None


@pytest.mark.parametrize("overrides,message", [
    (["loss.preset=shallow"], "unknown loss preset 'shallow'; valid: advanced, depth, depth_width, width"),
    (["loss.preset=[depth]"], "loss.preset: expected str"),
    (["loss.skew_alpha=0.5", "loss.skew_lambda=0.5"], "loss.skew_alpha and loss.skew_lambda are two spellings"),
    (["loss.skew_lambda=1"], "loss.skew_lambda: 1.0 must be in [0, 1) (lambda = 1 compares"),
    (["loss.skew_alpha=0"], "loss.skew_alpha: 0.0 must be in (0, 1] (s = 0 compares"),
    (["loss.skew_lambda=0.2", "loss.logits_args={lambda: 0.3}"], "loss.skew_lambda and loss.logits_args.lambda"),
    (["loss.logits_args={beta: high}"], "loss.logits_args.beta: expected float"),
    (["loss.delta=-0.1"], "loss.delta: -0.1 must be >= 0"),
])
def test_loss_errors(overrides, message):
    with pytest.raises(PipelineError) as e:
        load_config(None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_integer_keys_as_json_writes_them():
    """An explicit layer map written as JSON has string keys; they are the integers they spell."""
    cfg = load_config(None, ['mapping.strategy={"2": 2, "4": 6}'])
    assert cfg.mapping.strategy == {2: 2, 4: 6}
    with pytest.raises(PipelineError, match=r"mapping.strategy: expected str \| mapping int -> int, got \{'a': 2\}"):
        load_config(None, ['mapping.strategy={"a": 2}'])


def test_coerce_types_beyond_the_schema():
    """`coerce` (also TrainingArguments' values, pipeline/recipes/train.py): enums, literals, plain containers and
    classes; numbers from text only when asked (the schema's own keys stay strict: `--set cache.topk='8'` fails)."""
    import enum
    from typing import Literal, Optional, Union

    from pipeline.config import coerce

    class Strategy(str, enum.Enum):
        NO = "no"
        STEPS = "steps"

    assert coerce("steps", Strategy, "k") is Strategy.STEPS
    assert coerce("epoch", Union[Strategy, str], "k") == "epoch"
    with pytest.raises(PipelineError, match="k: expected Strategy, got 'epoch'"):
        coerce("epoch", Strategy, "k")
    assert coerce(False, Union[str, None, Literal[False]], "k") is False
    with pytest.raises(PipelineError, match="k: expected False, got 0"):
        coerce(0, Literal[False], "k")
    assert coerce({"a": 1}, Optional[dict], "k") == {"a": 1}
    assert coerce(["x"], list, "k") == ["x"]
    assert coerce("8", int, "k", from_text=True) == 8 and coerce("1e-4", float, "k", from_text=True) == 1e-4
    assert coerce(["2"], list[int], "k", from_text=True) == [2]
    with pytest.raises(PipelineError, match="k: expected int, got '8'"):
        coerce("8", int, "k")
    with pytest.raises(PipelineError, match=r"k: expected float, got '1e-4'"):
        coerce("1e-4", float, "k")
    with pytest.raises(PipelineError, match="cache.topk: expected int, got '8'"):
        load_config(None, ["cache.topk='8'"])
