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

    GPU:  source .gpu/env.sh; python3 scripts/bench_gpu.py --size full --out $OUT/bench_gpu.jsonl
    CPU:  .venv/bin/python scripts/bench_gpu.py --size tiny --device cpu
          .venv/bin/python scripts/bench_gpu.py --size full --shapes smollm2 --device cpu \\
              --sequences 16 --seq-len 256 --batch-size 8          (a middle size: where a CPU build's time goes)
"""

from __future__ import annotations

import os

# offline GPU nodes: never reach for the hub, nor for hub kernels
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["USE_HUB_KERNELS"] = "NO"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# converted packaged models live in the repo's cache/models (shared with the tests and the demo)
os.environ.setdefault("DISTILL_MODELS_DIR", str(REPO / "cache" / "models"))

from pipeline.cache import open_cache  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.sequences import sequences_from_config  # noqa: E402
from pipeline.teacher.capture import TeacherCapture  # noqa: E402

from pipeline.phase_one import build_cache  # noqa: E402
from pipeline.cache.info import summarize  # noqa: E402

DEMO_CONFIG = REPO / "configs" / "demo.yaml"
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

    return Path(resolve_model("smollm2-135m-instruct"))


def model_config(shape: str, tiny: bool, smol_dir: Path, tok):
    import transformers

    if shape == "smollm2":
        cfg = transformers.AutoConfig.from_pretrained(str(smol_dir))
        if tiny:  # 9 heads / 3 kv heads kept, head_dim 8
            cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size = 4, 72, 192
            cfg.head_dim = 72 // cfg.num_attention_heads
        return cfg
    if shape == "llama1b":  # Llama-3.2-1B's shape (default rope: its llama3 scaling changes no cost)
        d, ff, n, head_dim = (128, 512, 4, 4) if tiny else (2048, 8192, 16, 64)
        return transformers.LlamaConfig(
            vocab_size=128256, hidden_size=d, intermediate_size=ff, num_hidden_layers=n, num_attention_heads=32,
            num_key_value_heads=8, head_dim=head_dim, tie_word_embeddings=True, rope_theta=500000.0,
            max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    raise ValueError(f"unknown shape {shape!r} (one of {', '.join(SHAPES)})")


def make_teacher(shape: str, tiny: bool, smol_dir: Path, folder: Path, device: torch.device, dtype: torch.dtype):
    """A random-weight teacher on `device`, also saved (with the SmolLM2 tokenizer) to `folder`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smol_dir))
    cfg = model_config(shape, tiny, smol_dir, tok)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    # random init gives near-uniform logits; scale the head so top-k is meaningful (as the tests' teachers)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    model.eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
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
    """Prints each row as it finishes and appends it to the JSONL file."""

    def __init__(self, out: str | None, meta: dict):
        self.out = Path(out) if out else None
        self.meta = meta
        self.rows: list[dict] = []
        if self.out:
            self.out.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, row: dict, line: str) -> None:
        row = {**self.meta, **row}
        self.rows.append(row)
        print(line, flush=True)
        if self.out:
            with open(self.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    def error(self, shape: str, stage: str, e: BaseException) -> None:
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        traceback.print_exc(file=sys.stderr)
        self.emit({"shape": shape, "stage": stage, "error": msg},
                  f"| {shape} | {stage} | error: {msg.replace('|', '/')} | | | | | |")


def fmt(v, spec: str = ".0f", none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


def run_shape(shape: str, args, size: dict, device: torch.device, work: Path, report: Report) -> None:
    tiny = args.size == "tiny"
    n_seq = args.sequences or size["sequences"]
    seq_len = args.seq_len or size["seq_len"]
    batch = args.batch_size or size["batch"][shape]
    layers = TINY_LAYERS if tiny else SHAPES[shape]["layers"]
    codec = SHAPES[shape]["codec"]
    cuda = device.type == "cuda"
    dtype_name = "bfloat16" if cuda else "float32"
    folder = work / shape / "teacher"
    folder.mkdir(parents=True, exist_ok=True)
    shard = max(batch, size["shard"] // batch * batch)  # whole batches per shard: the build's batches = ours

    def config(setting: str, cache_dir: Path):
        overrides = [
            f"teacher.model={folder}", f"teacher.dtype={dtype_name}", f"teacher.device={device}",
            f"data.num_sequences={n_seq}", f"data.seq_len={seq_len}", "data.heldout_fraction=0",
            f"cache.layers={layers}", f"cache.batch_size={batch}", f"cache.hidden_codec={codec}",
            f"cache.shard_sequences={shard}", f"cache.chunk_sequences={min(size['chunk'], shard)}",
            f"cache.dir={cache_dir}", *SETTINGS[setting],
        ]
        return load_config(DEMO_CONFIG, overrides)

    # 0. the teacher (random weights, saved) and the sequences the build will see
    model = None
    try:
        t0 = time.perf_counter()
        model = make_teacher(shape, tiny, args.smol_dir, folder, device, getattr(torch, dtype_name))
        sync(device)
        t_model = time.perf_counter() - t0
        from pipeline.sources.models import load_tokenizer

        cfg = config("default", work / shape / "unused")
        t0 = time.perf_counter()
        seqs = sequences_from_config(cfg.data, load_tokenizer(str(folder)))
        t_seq = time.perf_counter() - t0
        ids = torch.from_numpy(seqs.input_ids).long()
        n_tok = ids.numel()
        batches = [ids[b : b + batch] for b in range(0, len(ids), batch)]
        mc = model.config
        desc = (f"d={mc.hidden_size}, {mc.num_hidden_layers} blocks, V={mc.vocab_size}, {dtype_name}; "
                f"{len(ids)} x {seq_len} tokens, batch {batch}; layers {layers} {codec}")
        report.emit({"shape": shape, "stage": "prepare", "tokens": n_tok, "model_seconds": t_model,
                     "sequences_seconds": t_seq, "description": desc, "layers": layers, "hidden_codec": codec,
                     "teacher_dtype": dtype_name, "batch_size": batch, "sequences": len(ids), "seq_len": seq_len},
                    f"| {shape} | prepare: {desc} | | | | | | init+save {t_model:.1f}, corpus {t_seq:.1f} |")
    except Exception as e:
        report.error(shape, "prepare", e)
        return

    # 1. plain forward
    t_fwd = None
    try:
        with torch.inference_mode():
            model(input_ids=batches[0].to(device), use_cache=False)  # warm-up: allocator, kernels
            sync(device)
            t0 = time.perf_counter()
            for b in batches:
                model(input_ids=b.to(device), use_cache=False)
            sync(device)
            t_fwd = time.perf_counter() - t0
        report.emit({"shape": shape, "stage": "forward", "tokens": n_tok, "seconds": t_fwd, "tok_per_s": n_tok / t_fwd},
                    f"| {shape} | forward | {n_tok / t_fwd:.0f} | 1.00 | | | | {t_fwd:.2f} |")
    except Exception as e:
        report.error(shape, "forward", e)
    if cuda:
        torch.cuda.empty_cache()

    # 2. capture alone (no writer)
    try:
        cc = cfg.cache
        cap = TeacherCapture(model, layers, cc.topk, cc.temperatures, cc.logit_dtype,
                             hidden_codec=codec if cuda else None)
        try:
            cap(batches[0])  # warm-up
            sync(device)
            t0 = time.perf_counter()
            pending = None  # as the build runs it: batch i+1 launched before batch i's results are taken
            for b in batches:
                launched = cap.submit(b)
                if pending is not None:
                    pending.result()
                pending = launched
            pending.result()
            sync(device)
            t_cap = time.perf_counter() - t0
            del pending, launched  # they hold the capture, hence the model
        finally:
            cap.close()
            cap = None  # (it holds the model and the last batch's block outputs)
        ratio = t_fwd / t_cap if t_fwd else None
        report.emit({"shape": shape, "stage": "capture", "tokens": n_tok, "seconds": t_cap, "tok_per_s": n_tok / t_cap,
                     "ratio": ratio, "ratio_to": "forward", "encode_on": "device" if cuda else "writer"},
                    f"| {shape} | capture ({'encoded on the device' if cuda else 'hidden fp32 to the host'}) "
                    f"| {n_tok / t_cap:.0f} | {fmt(ratio, '.2f')} of forward | | | | {t_cap:.2f} |")
    except Exception as e:
        report.error(shape, "capture", e)
    del model
    if cuda:
        torch.cuda.empty_cache()

    # 3-6. the whole build per compressor setting, the disk, GPU busy, bytes/token
    for setting in args.settings:
        stage = f"build {setting}"
        cache_dir = work / shape / f"cache-{setting}"
        try:
            shutil.rmtree(cache_dir, ignore_errors=True)
            cfg_s = config(setting, cache_dir)
            phases: dict = {}
            with GpuSampler(device) as gpu:
                sync(device)
                t0 = time.perf_counter()
                build_cache(cfg_s, progress=False, timings=phases)
                sync(device)
                t1 = time.perf_counter()
            t_build = t1 - t0
            nbytes = folder_bytes(cache_dir)
            info = summarize(open_cache(str(cache_dir)).manifest)
            bpt = info["bytes_per_token"]
            side, hidden = bpt["side_data"], bpt["hidden_all_layers"]
            t_disk = None
            try:
                t_disk = disk_write(cache_dir.parent, nbytes)
            except Exception as e:
                report.error(shape, f"disk {setting}", e)
            limit = max(t for t in (t_fwd, t_disk) if t is not None) if (t_fwd or t_disk) else None
            ratio = limit / t_build if limit else None
            loop_start = t0 + phases.get("setup", 0.0)
            busy, busy_loop = gpu.mean(), gpu.mean(loop_start, loop_start + phases.get("loop", 0.0))
            row = {"shape": shape, "stage": stage, "setting": setting, "overrides": SETTINGS[setting], "tokens": n_tok,
                   "seconds": t_build, "tok_per_s": n_tok / t_build, "ratio": ratio, "ratio_to": "max(forward, disk)",
                   "forward_seconds": t_fwd, "disk_seconds": t_disk, "cache_bytes": nbytes,
                   "disk_mb_per_s": nbytes / 1e6 / t_disk if t_disk else None,
                   "gpu_busy_pct": busy, "gpu_busy_loop_pct": busy_loop, "phases": phases,
                   "side_bytes_per_token": side, "hidden_bytes_per_token": hidden,
                   "manifest_bytes": info["bytes"]["total"], "cache_dir": str(cache_dir),
                   "hidden_compressor": info["hidden_compressor"], "side_compressor": info["side_compressor"]}
            secs = f"{t_build:.2f}"
            if phases:
                secs += (f" = setup {phases['setup']:.2f} + loop {phases['loop']:.2f} (writer wait "
                         f"{phases['writer_wait']:.2f}) + drain {phases['drain']:.2f} + manifest {phases['manifest']:.2f}")
            if t_disk:
                secs += f"; disk {t_disk:.2f} for {nbytes / 1e6:.0f} MB"
            report.emit(row, f"| {shape} | {stage} (hidden {info['hidden_compressor']}, side {info['side_compressor']}) "
                             f"| {n_tok / t_build:.0f} | {fmt(ratio, '.2f')} of max(fwd, disk) "
                             f"| {fmt(row['disk_mb_per_s'])} | {fmt(busy)} ({fmt(busy_loop)}) "
                             f"| {side:.1f} + {hidden:.0f} | {secs} |")
        except Exception as e:
            report.error(shape, stage, e)
        finally:
            if not args.keep:
                shutil.rmtree(cache_dir, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)


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


def main(argv: list[str] | None = None) -> list[dict]:
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
    shapes = [s for s in args.shapes.split(",") if s]
    args.settings = [s for s in args.settings.split(",") if s]
    bad = [s for s in shapes if s not in SHAPES] + [s for s in args.settings if s not in SETTINGS]
    if bad:
        ap.error(f"unknown shape or setting: {', '.join(bad)}")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
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
    print(f"{head}\nsize {args.size}, shapes {shapes}, settings {args.settings}, SmolLM2 config {args.smol_dir}, "
          f"work {work} ({filesystem(work)})\n\n{HEADER}", flush=True)
    report = Report(args.out, {"size": args.size, "device": str(device), "device_name": head})
    try:
        for shape in shapes:
            try:
                run_shape(shape, args, size, device, work, report)
            except Exception as e:  # a stage escaped its own guard
                report.error(shape, "run", e)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + summary(report.rows, shapes, args.settings), flush=True)
    return report.rows


if __name__ == "__main__":
    main()
