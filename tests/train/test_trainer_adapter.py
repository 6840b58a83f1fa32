"""The Trainer's private seams sit in one module, tested against the installed transformers, whose range
pyproject.toml pins."""

from __future__ import annotations

import os
import re
from pathlib import Path

import transformers
from packaging.version import Version
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import rotate_checkpoints

from pipeline.train import trainer as trainer_module
from pipeline.train.trainer_adapter import CALLED_ONLY, SEAMS, TESTED_TRANSFORMERS, TrainerAdapter, check_trainer_seams

ROOT = Path(__file__).resolve().parents[2]


def test_installed_trainer_has_every_seam():
    assert check_trainer_seams() == []
    lo, hi = map(Version, TESTED_TRANSFORMERS)
    assert lo <= Version(transformers.__version__) < hi


def test_a_moved_seam_is_reported():
    class Moved(Trainer):
        def _get_grad_norm(self, model):  # a parameter gone
            return None

    Moved._clip_grad_norm = None  # a method gone
    problems = check_trainer_seams(Moved)
    assert any("_clip_grad_norm is gone" in p for p in problems)
    assert any("_get_grad_norm" in p and "grad_norm" in p for p in problems)


def test_pyproject_pins_the_tested_range():
    text = (ROOT / "pyproject.toml").read_text()
    (spec,) = re.findall(r'"transformers([^"]*)"', text)
    lo, hi = TESTED_TRANSFORMERS
    assert spec == f">={lo},<{hi}"


def test_only_the_adapter_overrides_private_trainer_methods():
    """The distillation trainer itself overrides no private Trainer method (hooks and public ones only)."""
    cls = trainer_module.UniversalDistillationTrainer
    private = {name for name in vars(cls) if name.startswith("_") and not name.startswith("__")}
    assert not private & {name for name in dir(Trainer) if name.startswith("_") and not name.startswith("__")}
    assert set(SEAMS) - set(CALLED_ONLY) <= set(vars(TrainerAdapter))


def test_the_distillation_trainer_reaches_no_private_trainer_surface():
    """trainer.py neither calls a private Trainer method nor names a private parameter of a public one: those go
    through the adapter's hooks (prepared_inputs, checkpoint_saved), which check_trainer_seams covers."""
    source = Path(trainer_module.__file__).read_text()
    used = set(re.findall(r"\bself\.(_[a-z]\w*)", source)) | set(re.findall(r"\b(_internal_call)\b", source))
    private = {name for name in dir(Trainer) if name.startswith("_") and not name.startswith("__")}
    assert not used & (private | {"_internal_call"}), sorted(used & (private | {"_internal_call"}))


def test_a_checkpoint_save_that_writes_its_state_earlier_is_reported():
    """checkpoint_problem takes a checkpoint with a trainer_state.json as whole: that holds only while the
    Trainer writes that file after everything else and before it rotates older checkpoints away."""
    class Reordered(Trainer):
        def _save_checkpoint(self, model, trial):
            self.state.save_to_json(os.path.join("out", TRAINER_STATE_NAME))
            self.save_model("out", _internal_call=True)
            self._save_rng_state("out")
            rotate_checkpoints("out")

    problems = check_trainer_seams(Reordered)
    assert len(problems) == 1 and "Trainer._save_checkpoint no longer calls" in problems[0], problems
