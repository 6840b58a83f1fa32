"""Sampled logits vs top-k on real text: side-data bytes/token as the cache writes them, and what K draws hold.

The packaged SmolLM2-135M-Instruct runs once over N packed sequences of the packaged Wikipedia leads (the
demo config's data); its final hidden states are then replayed through `TeacherCapture` (the same LM-head
loop, top-k, lse and draws as `distill cache build`) for every layout below, and each layout's rows go
through the cache's own `ShardWriter` (format 3: ids as frequency ranks, brotli per chunk; chunks of 8
sequences). Bytes/token is the Arrow file (ids, lse at T = 1 and 2, and the layout's targets) over the
tokens, as `distill cache info` reports it. Per sampled layout also: the mean number of distinct ids per
position, the teacher mass they cover at T = 1 and 2, and the largest relative error of p_i = exp(z_i / T - lse) from the stored logits.

    python -m scripts.studies.sampled [--sequences 32] [--samples 8 16 32 64 128] [--proposal 1.0 2.0] [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from scripts import harness  # first: its environment comes before transformers

import numpy as np
import torch

from pipeline.cache.codecs import frequency_order, logits_from_numpy, pack_order
from pipeline.cache.spec import LOGITS_LEVEL
from pipeline.cache.writer import ShardLayout, ShardWriter
from pipeline.config import load_config
from pipeline.data.sequences import sequences_from_config
from pipeline.sources.models import load_model
from pipeline.teacher.capture import TeacherCapture
from scripts.harness import Results

BATCH = 8
TEMPS = [1.0, 2.0]


class _Replay(torch.nn.Module):
    """Stands in for the teacher: its decoder returns stored final hidden states, its head is the real one."""

    class _Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList()
            self.next = None

        def forward(self, input_ids=None, attention_mask=None, use_cache=False):
            return type("Out", (), {"last_hidden_state": self.next})()

    def __init__(self, model):
        super().__init__()
        self.decoder, self.head, self.config = self._Decoder(), model.get_output_embeddings(), model.config

    def get_decoder(self):
        return self.decoder

    def get_output_embeddings(self):
        return self.head


def measure(replay, normed, ids, topk, samples, proposal, logit_dtype, root: Path) -> dict:
    cap = TeacherCapture(replay, [], topk, TEMPS, logit_dtype, samples=samples, proposal_temperature=proposal)
    n, t = ids.shape
    order = frequency_order(ids, replay.config.vocab_size, np.uint16)
    layout = ShardLayout(seq_len=t, topk=topk, samples=samples, layers=(), n_temps=len(TEMPS), hidden_codec="bf16",
                         id_dtype="uint16", padded=False, chunk_sequences=BATCH, hidden_level=3,
                         logits_level=LOGITS_LEVEL, train_sequences=n, id_order=order.tobytes())
    writer = ShardWriter(root, 0, 0, n, layout)
    distinct, mass, rel_err, seconds = [], {T: [] for T in TEMPS}, 0.0, 0.0
    for b in range(0, n, BATCH):
        replay.decoder.next = normed[b : b + BATCH]
        start = time.perf_counter()
        c = cap(torch.from_numpy(ids[b : b + BATCH]), sequences=list(range(b, b + BATCH)))
        seconds += time.perf_counter() - start
        rows = {"input_ids": ids[b : b + BATCH], "topk_ids": c.topk_ids, "topk_logits": c.topk_logits, "lse": c.lse,
                "hidden": {}}
        if samples:
            rows.update(sample_ids=c.sample_ids, sample_counts=c.sample_counts, sample_logits=c.sample_logits)
            used = c.sample_counts > 0
            distinct.append(used.sum(-1).mean())
            stored = logits_from_numpy(c.sample_logits, logit_dtype)
            with torch.inference_mode():
                exact = replay.head(normed[b : b + BATCH]).float().gather(
                    -1, torch.from_numpy(c.sample_ids.astype(np.int64))).numpy()
            for j, T in enumerate(TEMPS):
                p = np.exp(stored / T - c.lse[j][..., None]) * used
                mass[T].append(p.sum(-1).mean())
            rel_err = max(rel_err, float(np.max(np.abs(np.expm1((stored - exact) / min(TEMPS))) * used)))
        writer.add(rows)
    record = writer.finish()
    cap.close()
    # the Arrow file and the packed id table (stored once per cache, in the manifest), as `cache info` counts
    out = {"bytes_per_token": (record["bytes"]["arrow"] + len(pack_order(order))) / ids.size, "capture_seconds": seconds}
    if samples:
        out.update(distinct=float(np.mean(distinct)), mass={T: float(np.mean(v)) for T, v in mass.items()},
                   p_rel_err=rel_err)
    return out


def layouts(args) -> list[tuple[int, int, float, str]]:
    """(top-k, draws, proposal temperature, logit dtype) of every row: top-k at each k, draws at each K and
    proposal temperature, and the first two K with fp32 logits."""
    return ([(k, 0, 1.0, "fp16") for k in args.topk] + [(0, k, tp, "fp16") for tp in args.proposal for k in args.samples]
            + [(0, k, 1.0, "fp32") for k in args.samples[:2]])


def final_hidden(model, ids: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model.get_decoder()(input_ids=torch.from_numpy(ids[b : b + BATCH]).long(),
                                              use_cache=False).last_hidden_state for b in range(0, len(ids), BATCH)])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--topk", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--samples", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    ap.add_argument("--proposal", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--out", metavar="FILE.jsonl", help="append one JSON line per row as it finishes")
    args = ap.parse_args(argv)
    harness.quiet_transformers()
    results = Results("sampled", args.out)
    cfg = load_config(harness.DEMO_CONFIG, [f"data.num_sequences={args.sequences}", "data.heldout_fraction=0"])
    model, tok = load_model(cfg.teacher.model)
    model.eval()
    ids = sequences_from_config(cfg.data, tok).input_ids.astype(np.uint16)
    normed = final_hidden(model, ids)
    replay = _Replay(model)
    print(f"{len(ids)} x {ids.shape[1]} tokens of wiki-vital, teacher {cfg.teacher.model}; Arrow side data "
          f"(input ids, lse at T = 1 and 2, targets; format 3: ids as frequency ranks, brotli per chunk, the id table), "
          f"chunks of {BATCH} sequences\n")
    print("| targets | logits | B/token | distinct ids / position | mass at T=1 | mass at T=2 | max rel err of p_i | capture s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (topk, samples, proposal, dt) in enumerate(layouts(args)):
            r = measure(replay, normed, ids, topk, samples, proposal, dt, Path(tmp) / str(i))
            name = f"top-{topk}" if topk else f"sampled K={samples}, Tp={proposal:g}"
            results.add({"case": f"{name}, {dt}", **r, "headline": {"B/token": r["bytes_per_token"]}})
            extra = (f"{r['distinct']:.1f} | {r['mass'][1.0]:.3f} | {r['mass'][2.0]:.3f} | {r['p_rel_err']:.1e}"
                     if samples else "| | |")
            print(f"| {name} | {dt} | {r['bytes_per_token']:.1f} | {extra} | {r['capture_seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
