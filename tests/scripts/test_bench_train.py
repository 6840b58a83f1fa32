"""scripts/bench/train/ (the fine-tune comparison) at a tiny size on the CPU, end to end: every child's rows are
printed as it finishes and in the summary, the --out file has a header and one line per child, --bf16 reaches
every training child's config, and a failing child is recorded rather than ending the run."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE = "scripts.bench.train.finetune"
TRAINING = ("finetune", "kd-dense", "kd-chunked", "ce-only", "online")


def _load_script(name: str = "common"):
    return importlib.import_module(f"scripts.bench.train.{name}")


def test_quick_sizes_and_overrides():
    bench = _load_script()
    q = bench.parse_args(["--vs-finetune", "--quick"])
    assert (q.seq_len, q.batch_size, q.steps, q.warmup) == (1024, 8, 3, 2)
    assert q.sequences == 8 * (2 + 3 + 1) and q.loader_seconds == 3
    o = bench.parse_args(["--vs-finetune", "--quick", "--seq-len", "32", "--batch-size", "2", "--steps", "1"])
    assert (o.seq_len, o.batch_size, o.steps, o.warmup, o.sequences) == (32, 2, 1, 2, 2 * (2 + 1 + 1))
    d = bench.parse_args(["--student-vocab", "262144"])
    assert (d.seq_len, d.batch_size, d.steps, d.sequences, d.quick) == (128, 2, 6, 40, False)


def test_failed_child_is_recorded_and_returned(tmp_path, capsys):
    bench = _load_script()
    args = bench.parse_args(["--vs-finetune", "--quick", "--out", str(tmp_path / "r.jsonl")])
    args.teacher_path = "none"
    runner = bench.Runner(args, tmp_path, "vs-finetune")
    result = runner.child("broken", "no-such-child")  # the child's own argparse refuses it
    assert result["returncode"] == 2 and "no-such-child" in result["error"]
    assert "broken: FAILED" in capsys.readouterr().out
    (line,) = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert line["name"] == "broken" and "error" in line["result"]


def test_tiny_vs_finetune_prints_and_records_every_child(tmp_path):
    out = tmp_path / "r.jsonl"
    # fp32: bf16 autocast doubles this run's time on a CPU without bf16 matmuls; --bf16's path into every
    # child's config is test_bf16_reaches_every_childs_training_config's
    cmd = [sys.executable, "-m", MODULE, "--quick", "--student-vocab", "49152",
           "--seq-len", "32", "--batch-size", "2", "--sequences", "12", "--steps", "1", "--warmup", "0",
           "--loader-seconds", "0.2", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    printed = r.stdout
    assert "FAILED" not in printed, printed

    summary = printed.index("\nsummary\n")
    for name in TRAINING:  # its step row and its breakdown row, once as it finished and once in the summary
        step = [i for i, line in enumerate(printed.splitlines()) if line.startswith(f"| {name} (")]
        phases = [line for line in printed.splitlines() if line.startswith(f"| {name} | ")]
        assert len(step) == 2 and len(phases) == 2, (name, printed)
        assert printed.index(f"| {name} (") < summary
    loader = [line for line in printed.splitlines() if line.startswith("cache DataLoader with the training run's")]
    assert len(loader) == 2 and "what kd-chunked consumes" in loader[0]
    for part in ("top-k ids + logits", "lse (2 temperature planes)", "hidden layer", "whole item"):
        assert f"| {part}" in printed

    header, *children = [json.loads(line) for line in out.read_text().splitlines()]
    assert header["kind"] == "header" and header["device"] == "cpu"
    assert header["settings"]["bf16"] is False and header["settings"]["seq_len"] == 32
    assert [c["name"] for c in children] == [*TRAINING, "loader"]
    for c in children:
        s = c["settings"]
        assert (s["vocab"], s["bf16"], s["seq_len"], s["batch_size"], s["device"]) == (49152, False, 32, 2, "cpu")
        assert "error" not in c["result"], c["result"]["error"]
    for c in children[:-1]:
        res = c["result"]
        assert res["step_s"] > 0 and res["peak_rss_mib"] > 0 and res["autocast"] is None
        assert abs(sum(res["breakdown"].values()) - res["step_s"]) < 1e-6 * max(1.0, res["step_s"]) + 1e-3
    assert {c["name"]: c["settings"]["chunk_tokens"] for c in children}["kd-dense"] == 0
    loader = children[-1]["result"]
    assert loader["tokens_per_s"] > 0 and loader["epochs"] >= 2
    assert loader["decode"]["tokens"] == 12 * 32 and loader["decode"]["item"]["wall_us"] > 0


def test_bf16_reaches_every_childs_training_config(tmp_path):
    """Every training child (the stock fine-tune included) loads its TrainingArguments from the demo config with
    common.training's overrides: --bf16 sets training.bf16 there, and only there."""
    from pipeline.config import load_config

    bench = _load_script()
    for flags, bf16 in (([], False), (["--bf16"], True)):
        args = bench.parse_args(["--vs-finetune", "--seq-len", "8", "--batch-size", "2", *flags])
        args.sequences, args.steps, args.warmup = 4, 1, 0
        cfg = load_config(bench.DEMO, bench.training(args, tmp_path / "run"))
        assert cfg.training["bf16"] is bf16 and cfg.training["per_device_train_batch_size"] == 2


def test_failed_children_leave_the_others_printed(capsys):
    """A failed reference (finetune) or KD child: the others still print, ratios against a missing reference
    read n/a, the loader still compares with kd-chunked."""
    bench = _load_script()
    args = bench.parse_args(["--vs-finetune", "--seq-len", "8", "--batch-size", "2", "--chunk-tokens", "4"])
    phases = dict.fromkeys(_load_script("phases").PHASES, 0.1)
    trained = {"step_s": 0.7, "steps": [0.7], "breakdown": phases, "autocast": None, "peak_rss_mib": 900.0,
               "rss_after_imports_mib": 400.0, "child_s": 1.0}
    part = {"wall_us": 2.0, "cpu_us": 2.0}
    loader = {"tokens_per_s": 100.0, "epochs": 2, "seconds": 1.0, "child_s": 1.0,
              "dataloader": {"batch_size": 2, "num_workers": 0, "pin_memory": False, "prefetch_factor": None},
              "decode": {"tokens": 16, "rounds": 3, "topk": 64, "lse_planes": 2, "hidden_codec": "bf16", "notes": [],
                         "parts": {"base": part, "topk": part, "lse": part, "hidden 3": part}, "item": part}}

    class Runner:
        def child(self, name, mode, loss=None, breakdown=False):
            if name in ("finetune", "kd-dense"):
                return {"error": "boom", "returncode": 1, "child_s": 1.0}
            return dict(loader if mode == "loader" else trained)

    _load_script("finetune").run(args, Runner())
    printed = capsys.readouterr().out
    assert "| finetune (stock Trainer, CE on input_ids) | failed |" in printed
    assert "| kd-dense (demo loss, dense logits) | failed |" in printed
    assert printed.count("| kd-chunked (demo loss, chunk 4) | 0.700 | n/a |") == 2
    assert "= 4.4x what kd-chunked consumes (23 tokens/s = 16 tokens / 0.700 s per step); goal >= 3x: met" in printed
    assert "| hidden layer 3 (bf16, zarr) | 2.00 | 2.00 | 500000 |" in printed


def test_targets_mode_is_its_own_run():
    bench = _load_script()
    assert bench.parse_args(["--targets"]).targets
    for other in ("--objectives", "--vs-finetune"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--targets", other])
    # one child per kind of target, each reading it from the one cache that holds all three
    bench = _load_script("targets")
    assert [loss[-1] for _, loss in bench.TARGETS] == [f"loss.logits_source={k}" for k in ("topk", "exact", "sampled")]
    assert all(loss[: len(bench.TARGET_CACHE)] == bench.TARGET_CACHE for _, loss in bench.TARGETS)


def test_target_kind_bytes_by_hand():
    from pipeline.cache.info import target_kind_bytes

    info = {"exact": {"layer": 30},
            "bytes_per_token": {"targets": {"topk_ids": 60.0, "topk_logits": 80.0, "sample_ids": 30.0,
                                            "sample_counts": 5.0, "sample_logits": 20.0},
                                "hidden_per_layer": {"15": 700.0, "30": 2100.0}}}
    assert target_kind_bytes(info, "topk") == 140.0
    assert target_kind_bytes(info, "sampled") == 55.0
    assert target_kind_bytes(info, "exact") == 2100.0
