"""How exact are full-distribution targets rebuilt from a stored last-block output h_n?

Exact targets (cache.logits exact) store the teacher's final norm and LM head once, and its last block's
output h_n per token; training rebuilds the logits as transform(norm(h_n) @ W.T). The only loss is the
rounding of h_n to its stored dtype (cache.exact_codec). This script measures it on the real teacher, for
fp32, fp16 and bf16, against the teacher's own forward logits, on held-out text:

    python -m scripts.studies.exact_error [--model smollm2-135m-instruct] [--sequences 16] [--seq-len 256] [--out FILE.jsonl]

Per dtype: the largest |logit error|, the mean and largest KL(true || rebuilt) per position at T = 1 and
T = 2 (float64), and the raw bytes per token of h_n. Each row prints as it finishes.
"""

from __future__ import annotations

import argparse

from scripts import harness  # first: its environment comes before transformers

import torch
import torch.nn.functional as F

from scripts.harness import Results

DTYPES = {"fp32": 4, "fp16": 2, "bf16": 2}  # the candidate codecs of h_n, and their bytes per value


def heldout_ids(tok, sequences: int, seq_len: int) -> torch.Tensor:
    """`sequences` held-out rows of the packaged Wikipedia leads."""
    from pipeline.config import config_from_dict
    from pipeline.data.sequences import sequences_from_config

    cfg = config_from_dict({"data": {"sources": [{"path": "wiki-vital"}], "seq_len": seq_len,
                                     "num_sequences": 4 * sequences, "heldout_fraction": 0.25, "seed": 0}})
    seqs = sequences_from_config(cfg.data, tok)
    return torch.from_numpy(seqs.input_ids[seqs.n_train:seqs.n_train + sequences]).long()


def forward(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the model's own logits [N, V] fp32, its last block's output h_n [N, d]) over `ids`, 4 rows at a time."""
    from pipeline.blocks import decoder_layers

    store = {}
    hook = decoder_layers(model)[-1].register_forward_hook(
        lambda m, a, out: store.__setitem__("h", (out[0] if isinstance(out, (tuple, list)) else out).detach()))
    with torch.no_grad():
        ref = torch.cat([model(input_ids=ids[i:i + 4]).logits.float() for i in range(0, len(ids), 4)])
        h_rows = []
        for i in range(0, len(ids), 4):
            model.get_decoder()(input_ids=ids[i:i + 4])
            h_rows.append(store["h"])
    hook.remove()
    return ref.reshape(-1, ref.shape[-1]), torch.cat(h_rows).reshape(-1, model.config.hidden_size)


def kl_stats(log_p: torch.Tensor, log_q: torch.Tensor) -> tuple[float, float]:
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl.mean().item(), kl.max().item()


def measure(name: str, head, h: torch.Tensor, ref: torch.Tensor, true: dict) -> dict:
    """One dtype: h_n through its codec, the logits rebuilt by the head, against the model's own."""
    from pipeline.cache.codecs import HIDDEN_CODECS

    codec = HIDDEN_CODECS.get(name)
    stored = torch.from_numpy(codec.decode(codec.encode(h.numpy())))
    with torch.no_grad():
        z = torch.cat([head.logits(stored[i:i + 1024]) for i in range(0, len(stored), 1024)])
    kl = {T: kl_stats(true[T], F.log_softmax(z.double() / T, -1)) for T in (1.0, 2.0)}
    return {"case": f"exact, h_n {name}", "bytes_per_token": DTYPES[name] * h.shape[-1],
            "max_abs_logit_error": (z - ref).abs().max().item(), "kl_t1": kl[1.0], "kl_t2": kl[2.0],
            "headline": {"KL T=1 mean": kl[1.0][0], "KL T=1 max": kl[1.0][1]}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", metavar="FILE.jsonl", help="append one JSON line per row as it finishes")
    args = ap.parse_args(argv)
    from pipeline.head import teacher_head
    from pipeline.sources import models

    harness.quiet_transformers()
    results = Results("exact_error", args.out)
    torch.manual_seed(0)
    model, tok = models.load_model(args.model)
    model.eval()
    head, why = teacher_head(model)
    if head is None:
        raise SystemExit(f"{args.model}: {why}")
    ids = heldout_ids(tok, args.sequences, args.seq_len)
    print(f"{args.model}: final norm {head.norm.kind}, {ids.shape[0]} held-out sequences x {ids.shape[1]} tokens, "
          f"d = {model.config.hidden_size}, vocab {head.head.weight.shape[0]}", flush=True)
    ref, h = forward(model, ids)
    print(f"largest |h_n| {h.abs().max().item():.4g} (fp16 holds up to 65504)\n", flush=True)

    print("| targets | bytes/token | max abs logit error | KL T=1 mean | KL T=1 max | KL T=2 mean | KL T=2 max |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    true = {T: F.log_softmax(ref.double() / T, -1) for T in (1.0, 2.0)}
    for name in DTYPES:
        r = results.add(measure(name, head, h, ref, true))
        print(f"| {r['case']} | {r['bytes_per_token']} | {r['max_abs_logit_error']:.3g} | {r['kl_t1'][0]:.3g} | "
              f"{r['kl_t1'][1]:.3g} | {r['kl_t2'][0]:.3g} | {r['kl_t2'][1]:.3g} |", flush=True)

    print("\nKL(teacher's own distribution || the one rebuilt from the stored h_n), float64, per position", flush=True)


if __name__ == "__main__":
    main()
