"""`distill report`: figures and report.md from real run directories, numbers checked against the inputs.

One tiny real run (3 steps, an evaluation every step) gives the log history; the eval JSONs are written
here with hand-picked per-item results so every table number can be recomputed from the book's formulas.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.evaluate.report import component_series, cosine_matrix, layer_series, load_run, split_history
from pipeline.recipes.report import run_report

_spec = importlib.util.spec_from_file_location("train_tiny", Path(__file__).parents[1] / "train" / "conftest.py")
tiny_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_mod)

PNGS = ("loss_components.png", "hidden_loss_by_layer.png", "layer_cosine_heatmap.png")


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """A 3-step run of the tiny pair with an evaluation at steps 0, 1, 2, 3 (and the final evaluate())."""
    from pipeline.recipes.cache import build_cache
    from pipeline.recipes.train import run_train

    root = tmp_path_factory.mktemp("report")
    tok = tiny_mod.byte_tokenizer()
    teacher = tiny_mod.save_model(tiny_mod.tiny_llama(4, 32, seed=0, init_range=0.2), tok, root / "teacher")
    student = tiny_mod.save_model(tiny_mod.tiny_llama(2, 24, seed=1), tok, root / "student")
    overrides = tiny_mod.base_overrides(root, teacher, student, str(root / "cache"))
    build_cache(load_config(None, overrides))
    out = root / "runs" / "full"
    training = tiny_mod.training_overrides(out, max_steps=3, eval_strategy="steps", eval_steps=1)
    run_train(load_config(None, overrides + training), echo=lambda *_: None)
    return out


def copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in ("trainer_state.json", "run.json"):
        shutil.copy2(src / name, dst / name)
    return dst


def without_hidden(run: Path) -> None:
    """Turn a run into what a gamma = 0 run logs: no hidden or cosine keys, other losses shifted."""
    state = json.loads((run / "trainer_state.json").read_text())
    for entry in state["log_history"]:
        for key in [k for k in entry if "hidden" in k or "_cos_" in k]:
            del entry[key]
        for key in [k for k in entry if k in ("loss", "eval_loss")]:
            entry[key] += 0.5
    (run / "trainer_state.json").write_text(json.dumps(state))
    summary = json.loads((run / "run.json").read_text())
    summary["config"]["loss"]["gamma"] = 0.0
    summary["metrics"]["eval_loss_after"] += 0.5
    (run / "run.json").write_text(json.dumps(summary))


# ------------------------------------------------------------------ eval JSONs with known items
N = 10
ITEMS = {  # role -> task -> per-item 0/1 (arc_easy reports acc_norm; winogrande only acc)
    "teacher": {"arc_easy": [1, 1, 1, 1, 1, 1, 1, 1, 0, 0], "winogrande": [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]},
    "pruned": {"arc_easy": [1, 1, 1, 0, 0, 0, 0, 0, 0, 0], "winogrande": [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]},
    "student": {"arc_easy": [1, 1, 1, 1, 1, 1, 0, 0, 0, 1], "winogrande": [1, 1, 1, 1, 1, 0, 0, 0, 0, 1]},
}
HELDOUT = {"teacher": (20.0, 0.0), "pruned": (40.0, 0.8), "student": (25.0, 0.2)}  # (perplexity, KL)


def eval_json(role: str) -> dict:
    tasks = {}
    for task, items in ITEMS[role].items():
        acc = sum(items) / N
        se = math.sqrt(acc * (1 - acc) / (N - 1))
        t = {"acc": acc - 0.1 if task == "arc_easy" else acc, "acc_stderr": se, "n": N, "split": "validation",
             "items": {"acc": items}}
        if task == "arc_easy":  # primary metric acc_norm: these are the items the paired differences use
            t.update({"acc_norm": acc, "acc_norm_stderr": se})
            t["items"] = {"acc": [0] + items[1:], "acc_norm": items}
        tasks[task] = t
    ppl, kl = HELDOUT[role]
    return {"model": role, "lm_eval_version": "0.4.9", "limit": N, "tasks": tasks,
            "heldout": {"perplexity": ppl, "kl_to_teacher": kl, "tokens": 500}}


def write_evals(folder: Path, roles=("teacher", "pruned", "student")) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for role in roles:
        (folder / f"{role}.json").write_text(json.dumps(eval_json(role)))


def paired(x: list[int], y: list[int]) -> tuple[float, float]:
    d = [a - b for a, b in zip(x, y)]
    mean = sum(d) / len(d)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in d) / (len(d) - 1)) / math.sqrt(len(d))


# ------------------------------------------------------------------ markdown parsing
def table(md: str, first_header: str) -> list[dict[str, str]]:
    """The markdown table whose header row starts with `| first_header |`, as row dicts."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def num(cell: str) -> float:
    return float(cell.split()[0].rstrip("%"))


def pm(cell: str) -> tuple[float, float]:
    parts = cell.replace("pp", "").split("±")
    return float(parts[0]), float(parts[1].split()[0])


def assert_png(path: Path) -> None:
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300, image.shape
    assert image.std() > 0.01  # not a blank canvas


# ------------------------------------------------------------------ tests
def test_extraction_matches_log_history(real_run):
    history = json.loads((real_run / "trainer_state.json").read_text())["log_history"]
    run = load_run(real_run)
    evals = [h for h in history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [0, 1, 2, 3, 3]  # the final evaluate() repeats step 3
    assert [e["step"] for e in run.evals] == [0, 1, 2, 3]
    assert [e["step"] for e in run.train] == [1, 2, 3]
    train, _ = split_history(history)
    assert all("train_loss" not in e for e in train)  # the end-of-training summary is no logging entry

    blocks, steps, matrix = cosine_matrix(run)
    assert blocks == [1, 2] and steps == [0, 1, 2, 3]
    last = {h["step"]: h for h in evals}
    expected = np.array([[last[s][f"eval_cos_L{j}"] for s in steps] for j in blocks])
    np.testing.assert_array_equal(matrix, expected)

    comps = component_series(run)
    assert list(comps) == ["loss", "loss_ce", "loss_kl", "loss_hidden"]  # no per-layer keys, no train_loss
    logged = [h for h in history if "loss" in h]
    assert comps["loss_kl"]["train"] == ([1, 2, 3], [h["loss_kl"] for h in logged])
    assert comps["loss"]["eval"] == ([0, 1, 2, 3], [last[s]["eval_loss"] for s in range(4)])
    per_layer = layer_series(run.train, "loss_hidden")
    assert per_layer[2] == ([1, 2, 3], [h["loss_hidden_L2"] for h in logged])
    assert run.layer_label(2) == "student block 2 -> teacher layer 4"


def test_single_run_report_with_table(real_run, tmp_path):
    run_dir = copy_run(real_run, tmp_path / "run")
    write_evals(run_dir / "eval")
    messages = []
    out = run_report([str(run_dir)], None, [], echo=messages.append)
    assert out == run_dir / "report" and str(out) in messages[0]
    assert sorted(p.name for p in out.iterdir()) == sorted(["report.md", *PNGS])
    for name in PNGS:
        assert_png(out / name)
    md = (out / "report.md").read_text()
    for name in PNGS:
        assert f"]({name})" in md  # relative links
    summary = json.loads((run_dir / "run.json").read_text())
    assert f"{summary['metrics']['eval_loss_before']:.4f} -> {summary['metrics']['eval_loss_after']:.4f}" in md
    assert "1->2, 2->4" in md and "alpha 0.4, beta 0.4, gamma 0.2" in md

    # Table 6.1: every cell equals the eval JSON it came from
    rows = {r["model"]: r for r in table(md, "model")}
    assert list(rows) == ["teacher", "pruned", "recovered"]
    for role, row in zip(("teacher", "pruned", "student"), rows.values()):
        ppl, kl = HELDOUT[role]
        assert num(row["held-out PPL"]) == ppl and num(row["KL to teacher"]) == kl
        for task, col in (("arc_easy", "arc_easy (acc_norm, n=10)"), ("winogrande", "winogrande (acc, n=10)")):
            acc = sum(ITEMS[role][task]) / N
            value, se = pm(row[col])
            assert value == pytest.approx(100 * acc, abs=0.005)
            assert se == pytest.approx(100 * math.sqrt(acc * (1 - acc) / (N - 1)), abs=0.005)

    # recovery metrics, by hand from the formulas
    acc = {r: {t: sum(v) / N for t, v in ITEMS[r].items()} for r in ITEMS}
    expected = {
        "PPL retention": 20 / 25,
        "PPL recovery": (40 - 25) / (40 - 20),
        "KL recovery": (0.8 - 0.2) / 0.8,
        "capability retention": (0.7 / 0.8 + 0.6 / 0.6) / 2,
        "benchmark recovery": ((0.7 - 0.3) / (0.8 - 0.3) + (0.6 - 0.4) / (0.6 - 0.4)) / 2,
    }
    assert acc["student"]["arc_easy"] == 0.7 and acc["pruned"]["winogrande"] == 0.4
    recovery = {r["metric"]: r["value"] for r in table(md, "metric")}
    for name, value in expected.items():
        assert num(recovery[name]) == pytest.approx(100 * value, abs=0.005), name
    per_task = {r["task"]: r for r in table(md, "task")}
    assert per_task["arc_easy"]["metric"] == "acc_norm" and per_task["winogrande"]["metric"] == "acc"
    diffs = []
    for task in ("arc_easy", "winogrande"):
        for col, other in (("recovered - teacher", "teacher"), ("recovered - pruned", "pruned")):
            mean, se = paired(ITEMS["student"][task], ITEMS[other][task])
            got = pm(per_task[task][col])
            assert got == pytest.approx((100 * mean, 100 * se), abs=0.005), (task, col)
            if other == "teacher":
                diffs.append((mean, se))
    mean_diff = pm(recovery["mean paired difference vs teacher"])
    combined = (sum(d for d, _ in diffs) / 2, math.sqrt(sum(s ** 2 for _, s in diffs)) / 2)
    assert mean_diff == pytest.approx((100 * combined[0], 100 * combined[1]), abs=0.005)

    # a second report replaces the first whole
    (out / "stale.png").write_bytes(b"x")
    run_report([str(run_dir)], None, [], echo=lambda *_: None)
    assert not (out / "stale.png").exists() and (out / "report.md").is_file()


def test_missing_roles_name_the_files_and_commands(real_run, tmp_path):
    run_dir = copy_run(real_run, tmp_path / "run")
    write_evals(run_dir / "eval", roles=("teacher",))
    out = run_report([str(run_dir)], str(tmp_path / "rep"), [], echo=lambda *_: None)
    md = (out / "report.md").read_text()
    assert "| model | eval file |" not in md and "### Recovery" not in md
    summary = json.loads((run_dir / "run.json").read_text())
    cache = summary["cache"]["dir"]
    assert f"pruned (`{run_dir / 'eval' / 'pruned.json'}`)" in md
    assert f"recovered (`{run_dir / 'eval' / 'student.json'}`)" in md
    assert "teacher (`" not in md  # present, so not listed
    assert (f"distill eval --model {summary['student_source']} --heldout {cache} "
            f"--out {run_dir / 'eval' / 'pruned.json'}") in md
    assert (f"distill eval --model {run_dir / 'student'} --heldout {cache} "
            f"--out {run_dir / 'eval' / 'student.json'}") in md


def test_several_runs_one_comparison_report(real_run, tmp_path):
    runs = tmp_path / "runs"
    full = copy_run(real_run, runs / "full")
    logits_only = copy_run(real_run, runs / "logits_only")
    without_hidden(logits_only)
    shared = tmp_path / "shared"
    write_evals(shared, roles=("teacher", "pruned"))
    write_evals(full / "eval", roles=("student",))
    out = run_report([str(full), str(logits_only)], None, [str(shared / "teacher.json"), str(shared / "pruned.json")],
                     echo=lambda *_: None)
    assert out == runs / "report"
    assert sorted(p.name for p in out.iterdir()) == sorted(["report.md", *PNGS])
    for name in PNGS:
        assert_png(out / name)
    md = (out / "report.md").read_text()
    rows = {r["run"]: r for r in table(md, "run")}
    assert list(rows) == ["`full`", "`logits_only`"]
    after = {name: json.loads((runs / name / "run.json").read_text())["metrics"]["eval_loss_after"]
             for name in ("full", "logits_only")}
    for name, row in rows.items():
        assert num(row["held-out loss after"]) == pytest.approx(after[name.strip("`")], abs=5e-5)
    assert num(rows["`full`"]["held-out PPL"]) == 25.0
    assert num(rows["`full`"]["KL recovery"]) == pytest.approx(75.0, abs=0.005)
    assert num(rows["`full`"]["PPL recovery"]) == pytest.approx(75.0, abs=0.005)
    assert rows["`logits_only`"]["KL recovery"] == "—"
    assert "gamma 0.0" in rows["`logits_only`"]["loss"]
    assert f"recovered (`{logits_only / 'eval' / 'student.json'}`)" in md and "pruned (`" not in md
    assert "No per-layer feature loss (`loss_hidden_L<j>`) in logits_only: loss.gamma = 0" in md

    # a run given as its own report's parent would be replaced: refused before writing
    with pytest.raises(PipelineError, match="would replace run directory"):
        run_report([str(full), str(logits_only)], str(runs), [], echo=lambda *_: None)


def test_gamma_zero_run_has_no_layer_figures(real_run, tmp_path):
    run_dir = copy_run(real_run, tmp_path / "run")
    without_hidden(run_dir)
    out = run_report([str(run_dir)], None, [], echo=lambda *_: None)
    assert sorted(p.name for p in out.iterdir()) == ["loss_components.png", "report.md"]
    md = (out / "report.md").read_text()
    assert "loss.gamma = 0" in md and "hidden_loss_by_layer.png" not in md


@pytest.mark.parametrize("case", ["no_dir", "no_state", "bad_json", "no_contract", "bad_task", "own_bad_json",
                                  "recovered_shared", "non_report_out", "bad_layer_map"])
def test_bad_input_is_one_line_and_writes_nothing(real_run, tmp_path, case):
    good = copy_run(real_run, tmp_path / "good")
    runs, evals, out = [str(good)], [], tmp_path / "out"
    if case == "no_dir":
        runs.append(str(tmp_path / "missing"))
    elif case == "no_state":
        (tmp_path / "empty").mkdir()
        runs.append(str(tmp_path / "empty"))
    elif case == "bad_json":
        (tmp_path / "teacher.json").write_text("{not json")
        evals = [str(tmp_path / "teacher.json")]
    elif case == "no_contract":
        (tmp_path / "pruned.json").write_text(json.dumps({"results": {}}))
        evals = [str(tmp_path / "pruned.json")]
    elif case == "bad_task":
        bad = eval_json("teacher")
        del bad["tasks"]["winogrande"]["acc"]
        (tmp_path / "teacher.json").write_text(json.dumps(bad))
        evals = [str(tmp_path / "teacher.json")]
    elif case == "own_bad_json":
        (good / "eval").mkdir()
        (good / "eval" / "student.json").write_text("")
    elif case == "recovered_shared":
        runs.append(str(copy_run(real_run, tmp_path / "other")))
        write_evals(tmp_path / "e", roles=("student",))
        evals = [str(tmp_path / "e" / "student.json")]
    elif case == "bad_layer_map":
        summary = json.loads((good / "run.json").read_text())
        summary["layer_map"] = {"one": 2}
        (good / "run.json").write_text(json.dumps(summary))
    elif case == "non_report_out":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    with pytest.raises(PipelineError) as err:
        run_report(runs, str(out), evals, echo=lambda *_: None)
    message = str(err.value)
    assert "\n" not in message
    named = {"no_dir": "missing", "no_state": "empty", "bad_json": "teacher.json", "no_contract": "pruned.json",
             "bad_task": "winogrande", "own_bad_json": "student.json", "recovered_shared": "student.json",
             "non_report_out": "out", "bad_layer_map": "run.json"}[case]
    assert named in message, message
    if case == "non_report_out":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert not out.exists()
    assert not (good / "report").exists() and not list(tmp_path.glob("*.tmp"))
