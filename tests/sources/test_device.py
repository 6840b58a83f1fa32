"""teacher.device: auto follows the hardware; an impossible request is a one-line error."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.sources.models import pick_device


def test_auto_and_explicit_devices(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    want = torch.device("cuda", 1 % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")
    assert pick_device("auto") == want
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(PipelineError, match="is not auto, cpu or cuda"):
        pick_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(PipelineError, match="no CUDA device"):
            pick_device("cuda:0")
