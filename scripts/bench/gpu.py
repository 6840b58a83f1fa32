"""Phase-one benchmark for a GPU (and, at small sizes, the CPU): how close does `distill cache build` come
to the teacher's own forward and to the disk?

For each teacher shape, over the SAME batches in one run:

1. forward   plain `model(input_ids=..., use_cache=False)` over every batch (inference mode, after one
             warm-up batch; synchronised around the timing on CUDA): the physical limit of the teacher;
2. capture   `TeacherCapture` alone on every batch (hooks, LM head in chunks, top-k, lse, block outputs
             copied to the host; on CUDA the hidden codec encodes on the device, as the build does with
             `cache.encode_on: auto`), no writer; its ratio is to the forward;
3. build     the whole `build_cache(cfg)` once per compressor setting: `default` (Blosc zstd 1 hidden states,
             zstd 1 side data), `zstd-3` (cache.compression_level=3), `lz4` (Blosc lz4 hidden states) and
             `brotli-side` (cache.side_compressor=brotli). Its ratio is max(forward, disk) / build: 1.00 = the
             build runs at the slower of the two physical limits. The seconds column splits the build into
             the steps build_cache times: setup (config, tokenizer, corpus, teacher load, digest, claim) /
             capture loop (with the time the teacher waited on the writer queue) / writer drain / manifest;
4. disk      the bytes that build wrote (the cache folder's file sizes), written raw to the same parent
             folder in 64 MiB blocks of preallocated random bytes, fsync at the end, timed;
5. GPU busy  NVML utilisation sampled every 0.1 s during the build (mean over the build, and over its
             capture loop); n/a on the CPU or without pynvml (nvidia-ml-py);
6. B/token   side data + all cached hidden layers, from the manifest (`summarize`).

Teachers are random-weight models built in-process from a config (nothing is downloaded), saved with the
SmolLM2 tokenizer to a folder that `teacher.model` points at:
  smollm2  the SmolLM2-135M config (--smol-config DIR; default .gpu/smol, then cache/models/*/), 8 layers bf16;
  llama1b  the Llama-3.2-1B shape (d=2048, 16 blocks, vocab 128,256, tied head), ids stored as uint32,
           8 layers int8.
bf16 teachers on CUDA, float32 on the CPU. --size full: 128 x 1024 tokens, batch 32 (smollm2) / 16 (llama1b);
--size tiny: 4 x 64 tokens, batch 2, both shapes shrunk to 4 blocks (vocab and head layout kept).
Every row is printed as it finishes and appended to --out (JSONL), so a time limit keeps what finished.

    GPU:  source .gpu/env.sh; python3 -m scripts.bench.gpu --size full --out $OUT/bench_gpu.jsonl
    CPU:  .venv/bin/python -m scripts.bench.gpu --size tiny --device cpu
          .venv/bin/python -m scripts.bench.gpu --size full --shapes smollm2 --device cpu \\
              --sequences 16 --seq-len 256 --batch-size 8          (a middle size: where a CPU build's time goes)
"""

from __future__ import annotations

import os

# offline GPU nodes: never reach for the hub, nor for hub kernels (set before transformers is imported)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["USE_HUB_KERNELS"] = "NO"

import argparse  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

from scripts import harness  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.cache import open_cache  # noqa: E402
from pipeline.cache.info import summarize  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.sequences import sequences_from_config  # noqa: E402
from pipeline.phase_one import build_cache  # noqa: E402
from pipeline.teacher.capture import TeacherCapture  # noqa: E402
from scripts.harness import Results  # noqa: E402

REPO = harness.ROOT
BLOCK = 64 << 20  # disk probe: bytes per write

SETTINGS = {  # compressor settings of the build, as config overrides
    "default": [],  # Blosc zstd 1 hidden states, zstd 1 side data (side_compressor auto with layers cached)
    "zstd-3": ["cache.compression_level=3"],
    "lz4": ["cache.hidden_compressor=lz4"],
    "brotli-side": ["cache.side_compressor=brotli"],
}
SIZES = {
    "full": {"sequences": 128, "seq_len": 1024, "batch": {"smollm2": 32, "llama1b": 16}, "shard": 64, "chunk": 8},
    "tiny": {"sequences": 4, "seq_len": 64, "batch": {"smollm2": 2, "llama1b": 2}, "shard": 2, "chunk": 2},
}
SHAPES = {  # cached layers (full size) and hidden codec
    "smollm2": {"layers": [4, 8, 12, 15, 19, 23, 26, 30], "codec": "bf16"},
    "llama1b": {"layers": [2, 4, 6, 8, 10, 12, 14, 16], "codec": "int8"},
}
TINY_LAYERS = [1, 2, 3, 4]
# --size tiny: both shapes shrunk to 4 blocks, their vocabulary and head layout kept
TINY_SHAPES = {"smollm2": {"num_hidden_layers": 4, "hidden_size": 72, "intermediate_size": 192, "head_dim": 8},
               "llama1b": {"num_hidden_layers": 4, "hidden_size": 128, "intermediate_size": 512, "head_dim": 4}}
HEAD_SCALE = 20.0  # random init gives near-uniform logits; a scaled head makes the top-k meaningful

HEADER = ("| shape | stage | tok/s | ratio | disk MB/s | GPU busy % build (loop) | B/token side + hidden | seconds |\n"
          "|---|---|---:|---:|---:|---:|---:|---|")


# ----------------------------------------------------------------------------- small helpers


def device_line(device: torch.device) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    what = f"{torch.cuda.get_device_name(device)} (CPU: {cpu})" if device.type == "cuda" else cpu
    return (f"device: {what}; {cores} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"transformers {transformers.__version__}")


def filesystem(path: Path) -> str:
    """'<type> at <mount point>, <free> GB free' for the file system holding `path`."""
    path = path.resolve()
    best = ("?", "/")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mnt, kind = line.split()[:3]
            if (path == Path(mnt) or Path(mnt) in path.parents) and len(mnt) >= len(best[1]):
                best = (kind, mnt)
    except OSError:
        pass
    st = os.statvfs(path)
    return f"{best[0]} at {best[1]}, {st.f_bavail * st.f_frsize / 1e9:.0f} GB free"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def find_smol_dir(given: str | None) -> Path:
    """A folder with the SmolLM2-135M config.json and tokenizer: --smol-config, .gpu/smol, cache/models/*/,
    else the packaged teacher converted once (pipeline.sources.models)."""
    if given:
        return Path(given)
    candidates = [REPO / ".gpu" / "smol"]
    for root in dict.fromkeys([Path(os.environ["DISTILL_MODELS_DIR"]), REPO / "cache" / "models"]):
        candidates += sorted(p.parent for p in root.glob("*/tokenizer.json"))
    for c in candidates:
        if (c / "config.json").is_file() and (c / "tokenizer.json").is_file():
            return c
    from pipeline.sources.models import resolve_model

    return Path(resolve_model(harness.PACKAGED_TEACHER))


def make_teacher(shape: str, tiny: bool, smol_dir: Path, folder: Path, device: torch.device, dtype: torch.dtype):
    """A random-weight teacher of `shape` on `device`, also saved (with the SmolLM2 tokenizer) to `folder`."""
    from transformers import AutoTokenizer

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r} (one of {', '.join(SHAPES)})")
    tok = AutoTokenizer.from_pretrained(str(smol_dir))
    shrink = TINY_SHAPES[shape] if tiny else {}
    if shape == "smollm2":
        config = harness.smollm2_config(str(smol_dir), **shrink)
    else:
        config = harness.llama1b_config(tok, **shrink)
    model = harness.random_model(config, device=device, dtype=dtype, head_scale=HEAD_SCALE)
    harness.save_model(model, folder, tok)
    return model


class GpuSampler:
    """NVML utilisation every 0.1 s on a background thread; `mean(t0, t1)` over a window (None: n/a)."""

    def __init__(self, device: torch.device):
        self.samples: list[tuple[float, int]] = []
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            try:  # by UUID: CUDA's device index is not NVML's under CUDA_VISIBLE_DEVICES
                uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
                self.handle = pynvml.nvmlDeviceGetHandleByUUID(("GPU-" + uuid).encode())
            except Exception:
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        except Exception:  # no pynvml, no driver library: n/a
            self.handle = None

    def __enter__(self):
        self._stop = threading.Event()
        if self.handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            try:
                self.samples.append((time.perf_counter(), self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu))
            except Exception:
                return
            self._stop.wait(0.1)

    def __exit__(self, *exc):
        self._stop.set()
        if self.handle is not None:
            self._thread.join()

    def mean(self, t0: float | None = None, t1: float | None = None) -> float | None:
        vals = [u for t, u in self.samples if (t0 is None or t >= t0) and (t1 is None or t <= t1)]
        return float(np.mean(vals)) if vals else None


_RANDOM_BLOCK: np.ndarray | None = None


def disk_write(parent: Path, nbytes: int) -> float:
    """Seconds to write `nbytes` raw (64 MiB blocks of preallocated random bytes) and fsync them."""
    global _RANDOM_BLOCK
    if _RANDOM_BLOCK is None:
        _RANDOM_BLOCK = np.random.default_rng(0).integers(0, 256, BLOCK, dtype=np.uint8)
    view = memoryview(_RANDOM_BLOCK)
    path = parent / "disk-probe.bin"
    try:
        t0 = time.perf_counter()
        with open(path, "wb", buffering=0) as f:
            left = nbytes
            while left > 0:
                n = min(left, BLOCK)
                f.write(view[:n])
                left -= n
            os.fsync(f.fileno())
        return time.perf_counter() - t0
    finally:
        path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the run


class Report:
    """Prints each row as it finishes and appends it (with the run's `meta`) to the JSONL file."""

    def __init__(self, out: str | None, meta: dict):
        self.results = Results("gpu", out)
        self.meta = meta

    @property
    def rows(self) -> list[dict]:
        return self.results.rows

    def emit(self, row: dict, line: str) -> None:
        self.results.add({**self.meta, **row})
        print(line, flush=True)

    def error(self, shape: str, stage: str, e: BaseException) -> None:
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        traceback.print_exc(file=sys.stderr)
        self.emit({"shape": shape, "stage": stage, "case": f"{shape} {stage}", "error": msg},
                  f"| {shape} | {stage} | error: {msg.replace('|', '/')} | | | | | |")


def fmt(v, spec: str = ".0f", none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


@dataclass
class Run:
    """One teacher shape's run: its sizes, where it goes, the config of a build."""

    shape: str
    tiny: bool
    n_seq: int
    seq_len: int
    batch: int
    layers: list[int]
    codec: str
    device: torch.device
    dtype_name: str
    folder: Path
    shard: int
    chunk: int

    @classmethod
    def of(cls, shape: str, args, size: dict, device: torch.device, work: Path) -> "Run":
        batch = args.batch_size or size["batch"][shape]
        return cls(shape=shape, tiny=args.size == "tiny", n_seq=args.sequences or size["sequences"],
                   seq_len=args.seq_len or size["seq_len"], batch=batch,
                   layers=TINY_LAYERS if args.size == "tiny" else SHAPES[shape]["layers"],
                   codec=SHAPES[shape]["codec"], device=device,
                   dtype_name="bfloat16" if device.type == "cuda" else "float32", folder=work / shape / "teacher",
                   shard=max(batch, size["shard"] // batch * batch),  # whole batches per shard: the build's = ours
                   chunk=size["chunk"])

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def config(self, setting: str, cache_dir: Path):
        return load_config(harness.DEMO_CONFIG, [
            f"teacher.model={self.folder}", f"teacher.dtype={self.dtype_name}", f"teacher.device={self.device}",
            f"data.num_sequences={self.n_seq}", f"data.seq_len={self.seq_len}", "data.heldout_fraction=0",
            f"cache.layers={self.layers}", f"cache.batch_size={self.batch}", f"cache.hidden_codec={self.codec}",
            f"cache.shard_sequences={self.shard}", f"cache.chunk_sequences={min(self.chunk, self.shard)}",
            f"cache.dir={cache_dir}", *SETTINGS[setting],
        ])


def prepare(run: Run, smol_dir: Path, report: Report):
    """0. the teacher (random weights, saved) and the batches the build will see -> (model, batches, cfg)."""
    from pipeline.sources.models import load_tokenizer

    run.folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = make_teacher(run.shape, run.tiny, smol_dir, run.folder, run.device, getattr(torch, run.dtype_name))
    sync(run.device)
    t_model = time.perf_counter() - t0
    cfg = run.config("default", run.folder.parent / "unused")
    t0 = time.perf_counter()
    ids = torch.from_numpy(sequences_from_config(cfg.data, load_tokenizer(str(run.folder))).input_ids).long()
    t_seq = time.perf_counter() - t0
    batches = [ids[b : b + run.batch] for b in range(0, len(ids), run.batch)]
    mc = model.config
    desc = (f"d={mc.hidden_size}, {mc.num_hidden_layers} blocks, V={mc.vocab_size}, {run.dtype_name}; "
            f"{len(ids)} x {run.seq_len} tokens, batch {run.batch}; layers {run.layers} {run.codec}")
    report.emit({"shape": run.shape, "stage": "prepare", "tokens": ids.numel(), "model_seconds": t_model,
                 "sequences_seconds": t_seq, "description": desc, "layers": run.layers, "hidden_codec": run.codec,
                 "teacher_dtype": run.dtype_name, "batch_size": run.batch, "sequences": len(ids),
                 "seq_len": run.seq_len},
                f"| {run.shape} | prepare: {desc} | | | | | | init+save {t_model:.1f}, corpus {t_seq:.1f} |")
    return model, batches, cfg


def time_forward(run: Run, model, batches: list, report: Report) -> float:
    """1. plain forward over every batch, after one warm-up batch."""
    n_tok = sum(b.numel() for b in batches)
    with torch.inference_mode():
        model(input_ids=batches[0].to(run.device), use_cache=False)  # warm-up: allocator, kernels
        sync(run.device)
        t0 = time.perf_counter()
        for b in batches:
            model(input_ids=b.to(run.device), use_cache=False)
        sync(run.device)
        t_fwd = time.perf_counter() - t0
    report.emit({"shape": run.shape, "stage": "forward", "tokens": n_tok, "seconds": t_fwd, "tok_per_s": n_tok / t_fwd,
                 "case": f"{run.shape} forward", "headline": {"tok/s": n_tok / t_fwd}},
                f"| {run.shape} | forward | {n_tok / t_fwd:.0f} | 1.00 | | | | {t_fwd:.2f} |")
    return t_fwd


def time_capture(run: Run, model, batches: list, cfg, t_fwd: float | None, report: Report) -> None:
    """2. TeacherCapture alone (no writer), batch i+1 launched before batch i's results are taken, as the
    build runs it."""
    n_tok = sum(b.numel() for b in batches)
    cc = cfg.cache
    cap = TeacherCapture(model, run.layers, cc.topk, cc.temperatures, cc.logit_dtype,
                         hidden_codec=run.codec if run.cuda else None)
    try:
        cap(batches[0])  # warm-up
        sync(run.device)
        t0 = time.perf_counter()
        pending = None
        for b in batches:
            launched = cap.submit(b)
            if pending is not None:
                pending.result()
            pending = launched
        pending.result()
        sync(run.device)
        t_cap = time.perf_counter() - t0
        del pending, launched  # they hold the capture, hence the model
    finally:
        cap.close()
    ratio = t_fwd / t_cap if t_fwd else None
    report.emit({"shape": run.shape, "stage": "capture", "tokens": n_tok, "seconds": t_cap, "tok_per_s": n_tok / t_cap,
                 "ratio": ratio, "ratio_to": "forward", "encode_on": "device" if run.cuda else "writer",
                 "case": f"{run.shape} capture", "headline": {"tok/s": n_tok / t_cap, "x forward": ratio}},
                f"| {run.shape} | capture ({'encoded on the device' if run.cuda else 'hidden fp32 to the host'}) "
                f"| {n_tok / t_cap:.0f} | {fmt(ratio, '.2f')} of forward | | | | {t_cap:.2f} |")


def build_row(run: Run, setting: str, cache_dir: Path, t_build: float, phases: dict, t_fwd, t_disk, gpu,
              loop_start: float) -> dict:
    nbytes = folder_bytes(cache_dir)
    info = summarize(open_cache(str(cache_dir)).manifest)
    bpt = info["bytes_per_token"]
    n_tok = run.n_seq * run.seq_len
    limit = max(t for t in (t_fwd, t_disk) if t is not None) if (t_fwd or t_disk) else None
    ratio = limit / t_build if limit else None
    return {"shape": run.shape, "stage": f"build {setting}", "setting": setting, "overrides": SETTINGS[setting],
            "tokens": n_tok, "seconds": t_build, "tok_per_s": n_tok / t_build, "ratio": ratio,
            "ratio_to": "max(forward, disk)", "forward_seconds": t_fwd, "disk_seconds": t_disk, "cache_bytes": nbytes,
            "disk_mb_per_s": nbytes / 1e6 / t_disk if t_disk else None, "gpu_busy_pct": gpu.mean(),
            "gpu_busy_loop_pct": gpu.mean(loop_start, loop_start + phases.get("loop", 0.0)), "phases": phases,
            "side_bytes_per_token": bpt["side_data"], "hidden_bytes_per_token": bpt["hidden_all_layers"],
            "manifest_bytes": info["bytes"]["total"], "cache_dir": str(cache_dir),
            "hidden_compressor": info["hidden_compressor"], "side_compressor": info["side_compressor"],
            "case": f"{run.shape} build {setting}", "headline": {"tok/s": n_tok / t_build, "x max(fwd, disk)": ratio}}


def build_line(run: Run, row: dict) -> str:
    phases, t_build, t_disk = row["phases"], row["seconds"], row["disk_seconds"]
    secs = f"{t_build:.2f}"
    if phases:
        secs += (f" = setup {phases['setup']:.2f} + loop {phases['loop']:.2f} (writer wait "
                 f"{phases['writer_wait']:.2f}) + drain {phases['drain']:.2f} + manifest {phases['manifest']:.2f}")
    if t_disk:
        secs += f"; disk {t_disk:.2f} for {row['cache_bytes'] / 1e6:.0f} MB"
    return (f"| {run.shape} | {row['stage']} (hidden {row['hidden_compressor']}, side {row['side_compressor']}) "
            f"| {row['tok_per_s']:.0f} | {fmt(row['ratio'], '.2f')} of max(fwd, disk) "
            f"| {fmt(row['disk_mb_per_s'])} | {fmt(row['gpu_busy_pct'])} ({fmt(row['gpu_busy_loop_pct'])}) "
            f"| {row['side_bytes_per_token']:.1f} + {row['hidden_bytes_per_token']:.0f} | {secs} |")


def time_build(run: Run, setting: str, t_fwd: float | None, report: Report) -> None:
    """3-6. the whole build at one compressor setting, the disk, GPU busy, bytes/token."""
    cache_dir = run.folder.parent / f"cache-{setting}"
    shutil.rmtree(cache_dir, ignore_errors=True)
    cfg = run.config(setting, cache_dir)
    phases: dict = {}
    with GpuSampler(run.device) as gpu:
        sync(run.device)
        t0 = time.perf_counter()
        build_cache(cfg, progress=False, timings=phases)
        sync(run.device)
        t_build = time.perf_counter() - t0
    t_disk = None
    try:
        t_disk = disk_write(cache_dir.parent, folder_bytes(cache_dir))
    except Exception as e:
        report.error(run.shape, f"disk {setting}", e)
    row = build_row(run, setting, cache_dir, t_build, phases, t_fwd, t_disk, gpu, t0 + phases.get("setup", 0.0))
    report.emit(row, build_line(run, row))


def run_shape(shape: str, args, size: dict, device: torch.device, work: Path, report: Report) -> None:
    run = Run.of(shape, args, size, device, work)
    try:
        model, batches, cfg = prepare(run, args.smol_dir, report)
    except Exception as e:
        report.error(shape, "prepare", e)
        return
    t_fwd = None
    for stage in ("forward", "capture"):
        try:
            if stage == "forward":
                t_fwd = time_forward(run, model, batches, report)
            else:
                time_capture(run, model, batches, cfg, t_fwd, report)
        except Exception as e:
            report.error(shape, stage, e)
        if run.cuda:
            torch.cuda.empty_cache()
    del model
    if run.cuda:
        torch.cuda.empty_cache()
    for setting in args.settings:
        try:
            time_build(run, setting, t_fwd, report)
        except Exception as e:
            report.error(shape, f"build {setting}", e)
        finally:
            if not args.keep:
                shutil.rmtree(run.folder.parent / f"cache-{setting}", ignore_errors=True)
    if not args.keep:
        shutil.rmtree(run.folder, ignore_errors=True)


def summary(rows: list[dict], shapes: list[str], settings: list[str]) -> str:
    """One line per shape: the columns side by side."""
    by = {(r["shape"], r["stage"]): r for r in rows if "error" not in r}
    head = "| teacher shape | forward tok/s | capture tok/s (x forward) | " + " | ".join(
        f"build {s} tok/s (x max(fwd, disk))" for s in settings) + " | disk MB/s | GPU busy % | B/token side + hidden |"
    lines = [head, "|---|" + "---:|" * (4 + len(settings))]
    for shape in shapes:
        fwd, cap = by.get((shape, "forward")), by.get((shape, "capture"))
        builds = [by.get((shape, f"build {s}")) for s in settings]
        cells = [shape, fmt(fwd and fwd["tok_per_s"]),
                 f"{fmt(cap and cap['tok_per_s'])} ({fmt(cap and cap.get('ratio'), '.2f')})"]
        cells += [f"{fmt(b and b['tok_per_s'])} ({fmt(b and b.get('ratio'), '.2f')})" for b in builds]
        ok = [b for b in builds if b]
        cells.append(" / ".join(fmt(b["disk_mb_per_s"]) for b in ok) or "n/a")
        cells.append(" / ".join(fmt(b["gpu_busy_pct"]) for b in ok) or "n/a")
        cells.append(" / ".join(f"{b['side_bytes_per_token']:.1f} + {b['hidden_bytes_per_token']:.0f}" for b in ok) or "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--shapes", default="smollm2,llama1b", help="comma-separated: smollm2, llama1b")
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated: {', '.join(SETTINGS)}")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--out", default=None, help="append every row to this JSONL file")
    ap.add_argument("--smol-config", default=None,
                    help="folder with the SmolLM2-135M config.json and tokenizer (default: .gpu/smol, then cache/models/*/)")
    ap.add_argument("--sequences", type=int, default=None, help="override the size's sequence count")
    ap.add_argument("--seq-len", type=int, default=None, help="override the size's sequence length")
    ap.add_argument("--batch-size", type=int, default=None, help="override the size's batch size (every shape)")
    ap.add_argument("--work", default=str(REPO / "cache"),
                    help="parent folder of the run's temporary folder of teachers and caches (default: the repo's "
                         "cache/, where cache.dir points by default)")
    ap.add_argument("--keep", action="store_true", help="keep the teacher folders and caches")
    args = ap.parse_args(argv)
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.settings = [s for s in args.settings.split(",") if s]
    bad = [s for s in args.shapes if s not in SHAPES] + [s for s in args.settings if s not in SETTINGS]
    if bad:
        ap.error(f"unknown shape or setting: {', '.join(bad)}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    harness.quiet_transformers()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    args.smol_dir = find_smol_dir(args.smol_config)
    size = SIZES[args.size]
    Path(args.work).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-", dir=args.work))
    head = device_line(device)
    print(f"{head}\nsize {args.size}, shapes {args.shapes}, settings {args.settings}, SmolLM2 config {args.smol_dir}, "
          f"work {work} ({filesystem(work)})\n\n{HEADER}", flush=True)
    report = Report(args.out, {"size": args.size, "device": str(device), "device_name": head})
    try:
        for shape in args.shapes:
            try:
                run_shape(shape, args, size, device, work, report)
            except Exception as e:  # a stage escaped its own guard
                report.error(shape, "run", e)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + summary(report.rows, args.shapes, args.settings), flush=True)
    return report.rows


if __name__ == "__main__":
    main()
