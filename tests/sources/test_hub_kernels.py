"""No model the pipeline loads can reach transformers' hub kernels: on a GPU, `model.train()` of a model
loaded with them kernelizes from the hub, which fails offline (ValueError: ... not available in the local
cache and Hugging Face Hub is in offline mode). On a CPU no kernel is mapped, so the check is on what
transformers is asked to do: `kernelize` is never reached."""

from __future__ import annotations

import pytest
import transformers.modeling_utils as modeling_utils
from transformers import AutoModelForCausalLM

from pipeline.sources import models


class HubReached(Exception):
    pass


@pytest.fixture
def no_hub(monkeypatch):
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)  # transformers' default: kernels on
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def kernelize(*a, **k):
        raise HubReached("kernelize was called")

    monkeypatch.setattr(modeling_utils, "kernelize", kernelize)


def test_loaded_models_never_kernelize(no_hub, tiny_teacher):
    model = models.load_weights(str(tiny_teacher))
    assert model.use_kernels is False
    model.train()  # what the Trainer does at every step on a GPU
    model.eval()
    assert model.use_kernels is False


def test_transformers_default_would_kernelize(no_hub, tiny_teacher):
    """The check has teeth: loaded without the pipeline's setting, the same model reaches kernelize."""
    with pytest.raises(HubReached):
        AutoModelForCausalLM.from_pretrained(str(tiny_teacher))
