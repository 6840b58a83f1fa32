"""Checkpoints count once whole: a run killed while it saves one resumes from the previous one, with one line
that names what it passed over; a full disk while saving a checkpoint or the run's outputs is one line too, and
leaves the previous student/ whole. Each resumed run ends with the uninterrupted run's weights, bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import TrainerState

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.recipes.train import run_train
from pipeline.train.trainer import UniversalDistillationTrainer
from pipeline.train.trainer_adapter import last_whole_checkpoint
from tests.tmpfs import resize, tmpfs
from tests.train.conftest import training_overrides

REPO = Path(__file__).resolve().parents[2]
# 6 optimizer steps, a checkpoint every 3; save_total_limit 1: the Trainer rotates checkpoint-3 away only once
# checkpoint-6 is whole
EXTRA = dict(max_steps=6, save_strategy="steps", save_steps=3, save_total_limit=1, lr_scheduler_type="linear",
             warmup_steps=1)
WEIGHTS = ("projectors.safetensors", "student/model.safetensors")

# the child of the kill test: `distill train` whose save of checkpoint-6 dies (SIGKILL) once the student and the
# projectors are in the folder, before the optimizer, scheduler, RNG states and trainer_state.json
KILLED_CHILD = """
import os, signal, sys
from pipeline.train.trainer import UniversalDistillationTrainer as T
saved = T.checkpoint_saved
def checkpoint_saved(self, output_dir):
    saved(self, output_dir)
    if self.state.global_step == 6:
        os.kill(os.getpid(), signal.SIGKILL)
T.checkpoint_saved = checkpoint_saved
from pipeline.cli import main
main(sys.argv[1:], prog_name="distill")
"""


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The uninterrupted run's folder."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_train(load_config(None, tiny["overrides"] + training_overrides(out, **EXTRA)))
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    for name in WEIGHTS:
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys()
        for key in wa:
            assert wa[key].equal(wb[key]), (name, key)


def _cli_args(tiny, out: Path, config: Path) -> list[str]:
    config.write_text("{}\n")
    sets = tiny["overrides"] + training_overrides(out, **EXTRA)
    return ["train", str(config)] + [x for o in sets for x in ("--set", o)]


def test_a_kill_mid_save_resumes_from_the_last_whole_checkpoint(tiny, reference, tmp_path):
    out = tmp_path / "run"
    args = _cli_args(tiny, out, tmp_path / "train.yaml")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(torch.get_num_threads()))  # the reference's threads
    killed = subprocess.run([sys.executable, "-c", KILLED_CHILD, *args], env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    half = out / "checkpoint-6"
    assert (half / "model.safetensors").is_file() and (half / "projectors.json").is_file()
    assert not (half / "trainer_state.json").exists() and not (half / "optimizer.pt").exists()
    assert (out / "checkpoint-3" / "trainer_state.json").is_file()  # not rotated away: checkpoint-6 never finished

    r = CliRunner().invoke(main, args + ["--resume"])
    assert r.exit_code == 0, r.output
    lines = [line.split("\r")[-1] for line in r.output.splitlines() if "--resume" in line]
    assert lines == [f"--resume: skipping {half} (no trainer_state.json: its save did not finish); "
                     f"resuming from {out / 'checkpoint-3'}"], r.output
    assert json.loads((out / "run.json").read_text())["resumed_from"] == str(out / "checkpoint-3")
    assert (half / "trainer_state.json").is_file() and not (out / "checkpoint-3").exists()  # saved over, rotated
    assert_same_weights(out, reference)


def test_a_state_file_cut_short_is_not_whole_and_a_rewritten_checkpoint_loses_its_own(tiny, reference, tmp_path,
                                                                                     monkeypatch):
    """A trainer_state.json that a kill cut short does not count; a whole checkpoint that a resumed run saves over
    (resumed here from an older one by name) stops counting as soon as that save starts."""
    out = tmp_path / "run"
    cfg = load_config(None, tiny["overrides"] + training_overrides(out, **dict(EXTRA, save_total_limit=None)))
    write = TrainerState.save_to_json

    def cut_short(self, path):  # half the file on disk, then the process "dies"
        if self.global_step == 6:
            text = json.dumps(self.__dict__, default=str)
            Path(path).write_text(text[: len(text) // 2])
            raise KeyboardInterrupt
        write(self, path)

    monkeypatch.setattr(TrainerState, "save_to_json", cut_short)
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg)
    monkeypatch.setattr(TrainerState, "save_to_json", write)
    lines: list[str] = []
    run_train(cfg, resume="latest", echo=lines.append)
    assert [line for line in lines if line.startswith("--resume")] == [
        f"--resume: skipping {out / 'checkpoint-6'} (trainer_state.json is cut short: its save did not finish); "
        f"resuming from {out / 'checkpoint-3'}"]
    assert_same_weights(out, reference)

    # checkpoint-6 is whole now; a run resumed from checkpoint-3 by name saves over it and dies after the student
    saved = UniversalDistillationTrainer.checkpoint_saved

    def die_at_6(self, output_dir):
        saved(self, output_dir)
        if self.state.global_step == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(UniversalDistillationTrainer, "checkpoint_saved", die_at_6)
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg, resume=str(out / "checkpoint-3"))
    with pytest.raises(PipelineError, match=r"checkpoint-6 is not a whole checkpoint \(no trainer_state.json"):
        run_train(cfg, resume=str(out / "checkpoint-6"))
    assert last_whole_checkpoint(out) == (str(out / "checkpoint-3"),
                                          [(str(out / "checkpoint-6"), "no trainer_state.json: its save did not finish")])


# ----------------------------------------------------------------------------- a full disk


def _blocks(folder: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in folder.rglob("*") if f.is_file())


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_old_student(tiny, reference, tmp_path):
    checkpoint = _blocks(reference / "checkpoint-6")
    with tmpfs(tmp_path / "mnt", checkpoint * 3 // 2) as mnt:  # room for checkpoint-3, not for checkpoint-6 beside it
        out = mnt / "run"
        cfg = load_config(None, tiny["overrides"] + training_overrides(out, **EXTRA))
        with pytest.raises(PipelineError) as e:
            run_train(cfg)
        message = str(e.value)
        assert message.startswith(f"training.output_dir {out}: no space left on device while saving checkpoint-6 "
                                  "(removed): a checkpoint takes about "), message
        assert message.endswith(f" free; free space and rerun with --resume to continue from {out / 'checkpoint-3'}")
        assert "\n" not in message
        assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3"]  # the cut checkpoint is gone

        resize(mnt, 4 * checkpoint)
        run_train(cfg, resume="latest")
        assert_same_weights(out, reference)

        # the disk fills again: a rerun from the final checkpoint takes no step and fails writing student/
        before = {p.name: p.read_bytes() for p in (out / "student").iterdir()}
        ballast = mnt / "ballast"
        ballast.write_bytes(b"\0" * (shutil.disk_usage(mnt).free - 16 * 1024))
        with pytest.raises(PipelineError) as e:
            run_train(cfg, resume="latest")
        assert str(e.value).startswith(f"training.output_dir {out}: no space left on device while writing the run's "
                                       "outputs (student/ is replaced only whole"), str(e.value)
        assert str(e.value).endswith(f"free space and rerun with --resume to continue from {out / 'checkpoint-6'}")
        assert {p.name: p.read_bytes() for p in (out / "student").iterdir()} == before
        assert not (out / "student.tmp").exists() and not (out / "student.old").exists()
        ballast.unlink()
        run_train(cfg, resume="latest")
        assert_same_weights(out, reference)
