"""The vocabulary losses alone, forward + backward, against the stock head + CE on the same tensors.

What a KD step adds to a fine-tune step at the vocabulary is bounded by the softmax normalisers it needs:
CE needs one at T = 1, the divergence one at its temperature (at T = 1 the same one). This script times,
on one [tokens, d] block of final hidden states and one [V, d] output embedding (both requiring grad):

    stock       F.linear + F.cross_entropy, autograd (what transformers' causal-LM loss does)
    ce          chunked_head_loss, CE only
    kd T=1      chunked, alpha .4 CE + beta .4 KL (top-k 64, tail bucket) at T = 1
    kd T=2      the same at T = 2 (the demo loss's temperature: one more normaliser)
    kd dense    the dense reference path: full logits, log-softmax CE + the dense KL

and prints each as it finishes: median seconds, the ratio to stock, and peak memory where it can be read
(CUDA: max_memory_allocated above the inputs). The chunk is the run's `auto` resolution for the device
unless --chunk is given.

    python -m scripts.bench.head_loss [--tokens 2048] [--vocab 49152 262144] [--bf16] [--repeats 5] [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from pipeline.head import HeadSpec
from pipeline.losses.chunked import VocabTerms, chunk_rows, chunked_head_loss
from pipeline.losses.logits import cross_entropy, logits_loss
from pipeline.targets import TopkTargets
from scripts.harness import Results, table_header, table_row

TOPK = 64


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def case(tokens: int, vocab: int, d: int, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(tokens, d, generator=g).to(device).requires_grad_(True)
    w = (torch.randn(vocab, d, generator=g) * d**-0.5).to(device).requires_grad_(True)
    targets = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    teacher = torch.randn(tokens, vocab, generator=g) * 2
    topk_logits, topk_ids = teacher.topk(TOPK, dim=-1)
    lse = {T: torch.logsumexp(teacher / T, dim=-1).to(device) for T in (1.0, 2.0)}
    return h, w, targets, topk_ids.to(device), topk_logits.to(device), lse


def runs(h, w, targets, ids, tl, lse, chunk: int):
    def stock():
        return F.cross_entropy(F.linear(h, w).float(), targets)

    def chunked(**kw):
        terms = VocabTerms(alpha=kw.get("alpha", 1.0), beta=kw.get("beta", 0.0), targets=targets, **{
            k: v for k, v in kw.items() if k not in ("alpha", "beta")})
        return lambda: chunked_head_loss(h, HeadSpec(w), terms, chunk)[0]

    def kd(T: float):
        return chunked(alpha=0.4, beta=0.4, temperature=T, teacher=TopkTargets(ids, tl, lse[T]))

    def dense():
        z = F.linear(h, w).float()
        mask = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
        kl = logits_loss("kl", z, ids, tl, lse[2.0], mask, 2.0)
        return 0.4 * cross_entropy(z, targets, mask) + 0.4 * kl

    return [("stock", stock), ("ce", chunked()), ("kd T=1", kd(1.0)), ("kd T=2", kd(2.0)), ("kd dense", dense)]


def timed(fn, h, w, repeats: int, bf16: bool) -> tuple[float, float | None]:
    device = h.device
    times, peak = [], None
    for i in range(repeats + 1):  # the first is a warm-up
        h.grad = w.grad = None
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = fn()
        loss.backward()
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return statistics.median(times), peak


def run_vocab(vocab: int, args, device: torch.device, results: Results) -> None:
    """Every run at one vocabulary size, a row each as it finishes."""
    chunk = args.chunk or chunk_rows("auto", vocab, device)
    tensors = case(args.tokens, vocab, args.hidden, device)
    print(f"\nvocab {vocab}, chunk {chunk} rows\n" + table_header(
        "run", f">s (median of {args.repeats})", ">vs stock", ">peak MiB above inputs", ">vs stock"), flush=True)
    ref_t = ref_m = None
    for label, fn in runs(*tensors, chunk=chunk):
        seconds, peak = timed(fn, *tensors[:2], args.repeats, args.bf16)
        ref_t = ref_t or seconds
        ref_m = ref_m or peak
        results.add({"case": f"{label}, vocab {vocab}{', bf16' if args.bf16 else ''}", "run": label, "vocab": vocab,
                     "chunk": chunk, "bf16": args.bf16, "seconds": seconds, "vs_stock": seconds / ref_t,
                     "peak_mib": peak, "headline": {"s": seconds, "vs stock": seconds / ref_t}})
        mem = (f"{peak:.0f}", f"{peak / ref_m:.2f}") if peak is not None else ("-", "-")
        print(table_row(label, f"{seconds:.4f}", f"{seconds / ref_t:.2f}", *mem), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=576, help="d (SmolLM2-135M's width)")
    ap.add_argument("--vocab", type=int, nargs="+", default=[49152, 262144])
    ap.add_argument("--chunk", type=int, default=None, help="rows per chunk (default: the device's auto size)")
    ap.add_argument("--bf16", action="store_true", help="under torch.autocast(bfloat16), as training.bf16 runs")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", metavar="FILE.jsonl", help="append one JSON line per run as it finishes")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    results = Results("head_loss", args.out)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}; {args.tokens} tokens x d {args.hidden}; top-k {TOPK}; "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}; torch threads {torch.get_num_threads()}", flush=True)
    for vocab in args.vocab:
        run_vocab(vocab, args, device, results)


if __name__ == "__main__":
    main()
