"""Phase one with a tensor-parallel teacher: what one process holds at TP = 2 against one process.

A random Llama teacher built in-process (default: d = 1024, 8 blocks, 16 heads / 8 KV heads, MLP 4096,
vocabulary 49,152 of the packaged SmolLM2 tokenizer, untied head, fp32: 151M parameters) is loaded the way
`distill cache build` loads it (pipeline.sources.models.load_weights with tensor_parallel N, under torchrun
with gloo), and its capture (pipeline.phase_one.make_capture: the vocabulary-parallel head at N > 1) runs over
--sequences rows of --seq-len tokens. Per process, rank 0's numbers:

- weights: the bytes of the teacher's parameters and buffers this process holds (a DTensor's local shard);
- head chunk: the capture's head buffers for one chunk of tokens, from the shapes the capture really used:
  the logits [chunk, V / N] fp32 of this rank's vocabulary rows, and the tail sums' work buffer it allocated
  (`_work`, kept across batches);
- peak RSS of the process (with the Python and torch runtime, the same in both).

Printed side by side with the ratio TP=2 / TP=1; the target is weights + head chunk <= 0.6x.

    python -m scripts.bench.tp_teacher [--sequences 8] [--seq-len 128] [--out FILE.jsonl]
    python -m scripts.bench.tp_teacher --smoke       # a d = 128 teacher: the script end to end
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from scripts import harness  # first: its environment comes before transformers

from scripts.harness import Results

TEACHER = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
               num_key_value_heads=8, head_dim=64, tie_word_embeddings=False)
SMOKE_TEACHER = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)


def worker(folder: str, tp: int, sequences: int, seq_len: int, out: str) -> None:
    """In each process of the launch: load the teacher as the build does, capture, write rank 0's numbers."""
    import resource

    import torch

    from pipeline.config import load_config
    from pipeline.phase_one import make_capture
    from pipeline.sources import models
    from pipeline.train.fsdp import local_bytes

    if tp > 1:
        torch.distributed.init_process_group("gloo")
    cfg = load_config(None, [f"teacher.model={folder}", "cache.topk=16", "cache.layers=[4]"])
    teacher = models.load_weights(folder, "float32", tensor_parallel=tp)
    shard = None
    if tp > 1:
        from pipeline.teacher.vocab_parallel import head_shard

        shard = head_shard(teacher.get_output_embeddings().weight)
    capture = make_capture(cfg.cache, teacher, [min(4, teacher.config.num_hidden_layers)], torch.device("cpu"),
                           shard)
    ids = torch.randint(0, teacher.config.vocab_size, (sequences, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for row in range(0, sequences, 2):
            capture(ids[row:row + 2])
    vocab_rows = shard.weight.shape[0] if shard is not None else teacher.config.vocab_size
    chunk = capture._head_chunk(2 * seq_len, torch.device("cpu"))
    work = capture._work.numel() * 4 if capture._work is not None else 0
    weights = local_bytes([*teacher.parameters(), *teacher.buffers()])
    if tp == 1 or torch.distributed.get_rank() == 0:
        Path(out).write_text(json.dumps({
            "weights": weights, "logits_chunk": min(chunk, 2 * seq_len) * vocab_rows * 4, "work_buffer": work,
            "vocab_rows": vocab_rows, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    capture.close()
    if tp > 1:
        torch.distributed.destroy_process_group()


def launch(folder: Path, tp: int, sequences: int, seq_len: int, out: Path) -> dict:
    args = [str(folder), str(tp), str(sequences), str(seq_len), str(out)]
    run = (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(tp)] if tp > 1 else [])
    cmd = [sys.executable, *run, "-m", "scripts.bench.tp_teacher", "--worker", *args]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // tp)))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"TP={tp} failed:\n{r.stderr[-3000:]}")
    return json.loads(out.read_text())


def report(one: dict, two: dict, parameters: int, results: Results) -> None:
    mib = 2 ** 20
    head = lambda m: m["logits_chunk"] + m["work_buffer"]
    rows = [("weights", one["weights"], two["weights"]), ("head chunk (logits + work buffer)", head(one), head(two)),
            ("weights + head chunk", one["weights"] + head(one), two["weights"] + head(two))]
    print(harness.table_header("per process", ">TP=1 MiB", ">TP=2 MiB", ">TP=2 / TP=1"))
    for name, a, b in rows:
        print(harness.table_row(name, f"{a / mib:.1f}", f"{b / mib:.1f}", f"{b / a:.3f}"), flush=True)
    print(harness.table_row("peak RSS", f"{one['peak_rss_mib']:.0f}", f"{two['peak_rss_mib']:.0f}",
                            f"{two['peak_rss_mib'] / one['peak_rss_mib']:.3f}"))
    total = rows[2][2] / rows[2][1]
    results.add({"case": f"TP=2 teacher, {parameters / 1e6:.0f}M parameters", "parameters": parameters,
                 "tp1": one, "tp2": two, "weights_ratio": rows[0][2] / rows[0][1],
                 "head_chunk_ratio": rows[1][2] / rows[1][1], "weights_and_head_ratio": total,
                 "rss_ratio": two["peak_rss_mib"] / one["peak_rss_mib"],
                 "headline": {"weights + head, TP2 / TP1": total}})


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        folder, tp, sequences, seq_len, out = argv[1:]
        return worker(folder, int(tp), int(sequences), int(seq_len), out)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--out", default=None, help="append one JSON line per result")
    ap.add_argument("--smoke", action="store_true", help="a d = 128 teacher: the script end to end")
    args = ap.parse_args(argv)
    results = Results("tp_teacher", args.out)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = harness.random_model(harness.smollm2_config(**(SMOKE_TEACHER if args.smoke else TEACHER)), seed=0)
        parameters = sum(p.numel() for p in model.parameters())
        folder = Path(harness.save_model(model, root / "teacher"))
        del model
        print(f"teacher: {parameters / 1e6:.1f}M parameters", flush=True)
        one = launch(folder, 1, args.sequences, args.seq_len, root / "tp1.json")
        two = launch(folder, 2, args.sequences, args.seq_len, root / "tp2.json")
        report(one, two, parameters, results)


if __name__ == "__main__":
    main()
