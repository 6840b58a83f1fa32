"""The ablation's command runner (`pipeline.recipes.ablate._run`) in the test's own process: the same `distill`
command and arguments, its output in the same log. Each of an ablation's commands in a fresh interpreter pays
~6 s of imports (torch, transformers) for a tiny model; tests whose subject is what the ablation does with its
commands' results (tables, resume, skipping) use this. The child processes themselves (isolation, a crash
leaving the others, SIGTERM) are tested with the real runner in tests/recipes/test_ablate.py."""

from __future__ import annotations

import time
import traceback
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.recipes import ablate as ablate_recipe


def run_here(args: list[str], log: Path, append: bool = False) -> tuple[int, float]:
    """`_run` in this process: (exit code, seconds); an exception is exit code 1 with its traceback in the log."""
    t0 = time.perf_counter()
    r = CliRunner().invoke(main, args)
    with open(log, "a" if append else "w") as fh:
        fh.write(r.output)
        if r.exc_info is not None and not isinstance(r.exception, SystemExit):
            fh.write("".join(traceback.format_exception(*r.exc_info)))
    return r.exit_code, time.perf_counter() - t0


def commands_in_process(mp: pytest.MonkeyPatch, except_variants: tuple[str, ...] = ()) -> None:
    """Route the ablation's commands through `run_here` for as long as `mp` is active; the commands of the
    variants named in `except_variants` (their logs are in the variant's folder) keep the real child process."""
    real = ablate_recipe._run

    def run(args: list[str], log: Path, append: bool = False) -> tuple[int, float]:
        return (real if Path(log).parent.name in except_variants else run_here)(args, log, append)

    mp.setattr(ablate_recipe, "_run", run)
