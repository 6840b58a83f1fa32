"""Phase one with a tensor-parallel teacher: what one process holds at TP = 2 against one process (TP = 1).

A random Llama teacher built in-process (default: d = 1024, 8 blocks, 16 heads / 8 KV heads of 64, MLP 4096,
the packaged SmolLM2 tokenizer's vocabulary of 49,152, untied head, fp32: 227M parameters, so that the weights
dominate) is saved once, then loaded in each process by the build's own code: pipeline.sources.models.load_weights
with tensor_parallel N (transformers' TP plan on the mesh of sources/models.py, under torchrun with gloo), the
head shard of pipeline.teacher.vocab_parallel.head_shard and pipeline.phase_one.make_capture, with the writing
rank keeping the block outputs as phase_one.Ranks decides. The capture then runs --batches batches of --batch
rows x --seq-len tokens (the CPU head chunk is 1,024 tokens: 4 x 256 fills it). Per process:

- weights: the bytes of the teacher's parameters and buffers the process holds (a DTensor's local shard,
  pipeline.train.fsdp.local_bytes);
- logits block: the largest [chunk, V / N] logits tensor the capture built, recorded from the tensor itself
  (the capture's final-logit transform is wrapped to see every chunk's logits);
- head working set: the peak of the bytes allocated and alive at once inside the capture's head step of the
  first batch (logits, the tail sums' work buffer, at TP > 1 the top-k mask; torch.profiler's CPU memory
  events, relative to what was alive when the step began);
- capture peak: the same over the whole first capture call (the forward's activations, the captured layers
  and the head);
- peak RSS (pipeline.resources.peak_rss_mib: VmHWM, since getrusage's ru_maxrss carries the launching
  process's RSS across fork + exec), and its growth over the process's peak before the teacher loaded (torch,
  gloo and the imports alone), as a cross-check that includes everything; and the RSS at the end split into
  anonymous and file-backed pages. The checkpoint is memory-mapped (safetensors): weights loaded without a copy
  stay pages of the file, resident once touched, counted in the RSS of every process that maps them and shared
  between them (the page cache), so the RSS does not halve where the weights do. On a GPU the weights are
  copied into each device, where the local bytes (the first row) are what it holds.

The table gives each at TP = 1 and TP = 2 (the larger of the two ranks: a rank must fit its GPU), and the ratio
TP=2 / TP=1. The issue's target: weights + head chunk <= 0.6x.

    python -m scripts.bench.tp_teacher [--batch 4] [--seq-len 256] [--batches 2] [--out FILE.jsonl]
    python -m scripts.bench.tp_teacher --smoke       # a d = 128 teacher: the script end to end (~30 s)
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

VOCAB = 49152  # the packaged SmolLM2 tokenizer's
TEACHER = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
               num_key_value_heads=8, head_dim=64, vocab_size=VOCAB, tie_word_embeddings=False)
SMOKE_TEACHER = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32, vocab_size=VOCAB, tie_word_embeddings=False)
HEAD_STEP = "tp_teacher.head"  # the profiler's name for the capture's head step
MIB = 2 ** 20


# ----------------------------------------------------------------------------- in each process


class LogitsProbe:
    """Stands in for the capture's HeadSpec: the same transform, recording the shape and bytes of every chunk's
    logits it is handed (the tensor the capture built: [chunk, V] at TP = 1, [chunk, V / N] at TP = N)."""

    def __init__(self, spec):
        self.spec, self.blocks = spec, []

    def transform(self, z):
        self.blocks.append((list(z.shape), z.numel() * z.element_size()))
        return self.spec.transform(z)

    def __getattr__(self, name):
        return getattr(self.spec, name)


def name_head_step(capture) -> None:
    """Wrap the capture's head step (this instance only) in a profiler range, so its memory can be told apart."""
    from torch.profiler import record_function

    inner = capture._head_outputs

    def head_outputs(*args, **kwargs):
        with record_function(HEAD_STEP):
            return inner(*args, **kwargs)

    capture._head_outputs = head_outputs


def memory_peaks(trace: Path) -> dict:
    """From a chrome trace of torch.profiler (profile_memory): the peak bytes allocated and alive at once over
    the whole trace and inside the head step, each relative to what was alive when it began. The profiler's
    "Total Allocated" counts only allocations made while it runs, so earlier tensors are not in it."""
    events = json.loads(trace.read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                    key=lambda e: e["ts"])
    step = next(e for e in events if e.get("name") == HEAD_STEP and e.get("ph") == "X")
    inside = [e for e in memory if step["ts"] <= e["ts"] <= step["ts"] + step["dur"]]
    return {"capture_peak": _peak(memory), "head_peak": _peak(inside)}


def _peak(events: list[dict]) -> int:
    if not events:
        return 0
    base = events[0]["args"]["Total Allocated"] - events[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in events) - base


def rss_parts() -> dict:
    """This process's resident memory now, split: anonymous (its own allocations) and file-backed (mapped files:
    the libraries, and the checkpoint's pages that safetensors maps and the loaded weights may still view)."""
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.is_file() else []
    kib = {line.split(":")[0]: int(line.split()[1]) for line in lines if line.startswith(("RssAnon", "RssFile"))}
    return {"rss_anon_mib": kib.get("RssAnon", 0) / 1024, "rss_file_mib": kib.get("RssFile", 0) / 1024}


def worker(folder: str, tp: int, batch: int, seq_len: int, batches: int, trace_dir: str) -> dict:
    """One process of the launch: load the teacher and capture as `distill cache build` does; its numbers."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pipeline.config import load_config
    from pipeline.phase_one import Ranks, _dist, make_capture
    from pipeline.resources import peak_rss_mib, rss_now_mib
    from pipeline.sources import models
    from pipeline.train.fsdp import local_bytes

    rank, world = _dist(tp)  # the build's own process-group start (gloo on a CPU)
    ranks = Ranks(rank, world, tp)
    runtime_rss = peak_rss_mib()
    cfg = load_config(None, [f"teacher.model={folder}", "cache.topk=16"])
    teacher = models.load_weights(folder, "float32", tensor_parallel=tp)
    weights = local_bytes([*teacher.parameters(), *teacher.buffers()])
    loaded = {"loaded_peak_rss_mib": peak_rss_mib(), "loaded_rss_mib": rss_now_mib()}
    shard, device = None, torch.device("cpu")
    if tp > 1:
        from pipeline.teacher.vocab_parallel import head_shard

        device = teacher.get_output_embeddings().weight.device
        shard = head_shard(teacher.get_output_embeddings().weight, ranks.tp_group())
    n = teacher.config.num_hidden_layers
    capture = make_capture(cfg.cache, teacher, [n // 2, n], device, shard, keep_hidden=ranks.writes)
    capture.head_spec = probe = LogitsProbe(capture.head_spec)
    name_head_step(capture)
    ids = torch.randint(0, teacher.config.vocab_size, (batches * batch, seq_len),
                        generator=torch.Generator().manual_seed(0))
    trace = Path(trace_dir) / f"tp{tp}_rank{rank}.json"
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        capture(ids[:batch])
    prof.export_chrome_trace(str(trace))
    for b in range(1, batches):
        capture(ids[b * batch:(b + 1) * batch])
    largest = max(probe.blocks, key=lambda blk: blk[1])
    capture.close()
    if tp > 1:
        torch.distributed.destroy_process_group()
    return {"rank": rank, "tp": tp, "writes": ranks.writes, "weights": weights, "logits_block": largest[1],
            "logits_shape": largest[0], **memory_peaks(trace), "runtime_rss_mib": runtime_rss,
            **loaded, "peak_rss_mib": peak_rss_mib(), **rss_parts()}


# ----------------------------------------------------------------------------- the launches


def launch(folder: Path, tp: int, batch: int, seq_len: int, batches: int, threads: int, trace_dir: Path
           ) -> list[dict]:
    """The worker in tp processes (torchrun --standalone: a free port) -> each rank's numbers, by rank."""
    kwargs = dict(folder=str(folder), tp=tp, batch=batch, seq_len=seq_len, batches=batches,
                  trace_dir=str(trace_dir))
    run = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(tp)] if tp > 1 else []
    cmd = [sys.executable, *run, "-m", "scripts.harness", "scripts.bench.tp_teacher", "worker", json.dumps(kwargs)]
    r = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS=str(threads)), capture_output=True, text=True,
                       cwd=harness.ROOT)
    rows = [json.loads(x[len(harness.RESULT):]) for x in r.stdout.splitlines() if x.startswith(harness.RESULT)]
    if r.returncode or len(rows) != tp:
        raise SystemExit(f"TP={tp} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return sorted(rows, key=lambda row: row["rank"])


QUANTITIES = {  # row label -> the per-process number (bytes), from one rank's numbers
    "weights (a)": lambda m: m["weights"],
    "logits block [chunk, V/N] (b)": lambda m: m["logits_block"],
    "weights + logits block (a + b)": lambda m: m["weights"] + m["logits_block"],
    "head working set (profiler)": lambda m: m["head_peak"],
    "weights + head working set": lambda m: m["weights"] + m["head_peak"],
    "capture peak, first batch (profiler)": lambda m: m["capture_peak"],
    "peak RSS (c)": lambda m: m["peak_rss_mib"] * MIB,
    "peak RSS over the runtime's": lambda m: (m["peak_rss_mib"] - m["runtime_rss_mib"]) * MIB,
    "RSS at the end: anonymous": lambda m: m["rss_anon_mib"] * MIB,
    "RSS at the end: file-backed": lambda m: m["rss_file_mib"] * MIB,
}


def per_process(ranks: list[dict]) -> dict[str, float]:
    """Each quantity at its largest over the ranks (what each rank's device must hold)."""
    return {label: max(get(m) for m in ranks) for label, get in QUANTITIES.items()}


def report(one: list[dict], two: list[dict], shape: dict, parameters: int, tokens: int, results: Results) -> dict:
    a, b = per_process(one), per_process(two)
    print(harness.table_header("per process (largest rank)", ">TP=1 MiB", ">TP=2 MiB", ">TP=2 / TP=1"))
    for label in QUANTITIES:
        print(harness.table_row(label, f"{a[label] / MIB:.1f}", f"{b[label] / MIB:.1f}",
                                f"{b[label] / a[label]:.3f}"), flush=True)
    ratio = {label: b[label] / a[label] for label in QUANTITIES}
    print(f"logits block: TP=1 {one[0]['logits_shape']}, TP=2 {[m['logits_shape'] for m in two]} (fp32)")
    target = ratio["weights + logits block (a + b)"]
    print(f"target weights + head chunk <= 0.6x: {target:.3f} ({'met' if target <= 0.6 else 'NOT met'})")
    return results.add({
        "case": f"TP=2 teacher, {parameters / 1e6:.0f}M parameters", "parameters": parameters, "shape": shape,
        "tokens_per_batch": tokens, "tp1": one, "tp2": two,
        "weights_ratio": ratio["weights (a)"], "logits_block_ratio": ratio["logits block [chunk, V/N] (b)"],
        "weights_and_head_ratio": target, "head_chunk_ratio": ratio["head working set (profiler)"],
        "weights_and_working_set_ratio": ratio["weights + head working set"],
        "capture_peak_ratio": ratio["capture peak, first batch (profiler)"], "rss_ratio": ratio["peak RSS (c)"],
        "rss_growth_ratio": ratio["peak RSS over the runtime's"],
        "headline": {"weights + head, TP2 / TP1": target, "peak RSS, TP2 / TP1": ratio["peak RSS (c)"]}})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4, help="rows per capture batch (default 4)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per row (default 256: 4 x 256 = one CPU head "
                                                             "chunk of 1,024 tokens)")
    ap.add_argument("--batches", type=int, default=2, help="capture batches per process; the first is profiled "
                                                           "(default 2)")
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per process (default 1: memory does not "
                                                           "depend on it, and the cores may be shared)")
    ap.add_argument("--out", default=None, help="append one JSON line per result")
    ap.add_argument("--smoke", action="store_true", help="a d = 128 teacher, 2 rows x 64 tokens: the script end to end")
    args = ap.parse_args(argv)
    shape = SMOKE_TEACHER if args.smoke else TEACHER
    batch, seq_len = (2, 64) if args.smoke else (args.batch, args.seq_len)
    results = Results("tp_teacher", args.out)
    harness.quiet_transformers()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = harness.random_model(harness.smollm2_config(**shape), seed=0)
        parameters = sum(p.numel() for p in model.parameters())
        folder = Path(harness.save_model(model, root / "teacher"))
        del model
        print(f"teacher: {parameters / 1e6:.1f}M parameters, {batch} x {seq_len} tokens per batch", flush=True)
        one = launch(folder, 1, batch, seq_len, args.batches, args.threads, root)
        print("TP=1: done", flush=True)
        two = launch(folder, 2, batch, seq_len, args.batches, args.threads, root)
        print("TP=2: done", flush=True)
        report(one, two, shape, parameters, batch * seq_len, results)


if __name__ == "__main__":
    main()
