"""How exact are full-distribution targets rebuilt from a stored last-block output h_n?

Exact targets (cache.logits exact) store the teacher's final norm and LM head once, and its last block's
output h_n per token; training rebuilds the logits as transform(norm(h_n) @ W.T). The only loss is the
rounding of h_n to its stored dtype (cache.exact_codec). This script measures it on the real teacher, for
fp32, fp16 and bf16, against the teacher's own forward logits, on held-out text:

    python scripts/exact_error.py [--model smollm2-135m-instruct] [--sequences 16] [--seq-len 256]

Per dtype: the largest |logit error|, the mean and largest KL(true || rebuilt) per position at T = 1 and
T = 2 (float64), and the raw bytes per token of h_n. Each row prints as it finishes.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()

    from pipeline.cache.codecs import HIDDEN_CODECS
    from pipeline.config import config_from_dict
    from pipeline.data.sequences import sequences_from_config
    from pipeline.head import teacher_head
    from pipeline.sources import models
    from pipeline.blocks import decoder_layers

    torch.manual_seed(0)
    model, tok = models.load_model(args.model)
    model.eval()
    head, why = teacher_head(model)
    if head is None:
        raise SystemExit(f"{args.model}: {why}")
    cfg = config_from_dict({"data": {"sources": [{"path": "wiki-vital"}], "seq_len": args.seq_len,
                                     "num_sequences": 4 * args.sequences, "heldout_fraction": 0.25, "seed": 0}})
    seqs = sequences_from_config(cfg.data, tok)
    ids = torch.from_numpy(seqs.input_ids[seqs.n_train:seqs.n_train + args.sequences]).long()
    d = model.config.hidden_size
    print(f"{args.model}: final norm {head.norm.kind}, {ids.shape[0]} held-out sequences x {ids.shape[1]} tokens, "
          f"d = {d}, vocab {head.head.weight.shape[0]}", flush=True)

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
    h = torch.cat(h_rows).reshape(-1, d)
    ref = ref.reshape(-1, ref.shape[-1])
    print(f"largest |h_n| {h.abs().max().item():.4g} (fp16 holds up to 65504)\n", flush=True)

    def kl_stats(log_p: torch.Tensor, log_q: torch.Tensor) -> tuple[float, float]:
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        return kl.mean().item(), kl.max().item()

    print("| targets | bytes/token | max abs logit error | KL T=1 mean | KL T=1 max | KL T=2 mean | KL T=2 max |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    true = {T: F.log_softmax(ref.double() / T, -1) for T in (1.0, 2.0)}
    for name in ("fp32", "fp16", "bf16"):
        codec = HIDDEN_CODECS.get(name)
        stored = torch.from_numpy(codec.decode(codec.encode(h.numpy())))
        with torch.no_grad():
            z = torch.cat([head.logits(stored[i:i + 1024]) for i in range(0, len(stored), 1024)])
        err = (z - ref).abs().max().item()
        row = [kl_stats(true[T], F.log_softmax(z.double() / T, -1)) for T in (1.0, 2.0)]
        nbytes = {"fp32": 4, "fp16": 2, "bf16": 2}[name] * d
        print(f"| exact, h_n {name} | {nbytes} | {err:.3g} | {row[0][0]:.3g} | {row[0][1]:.3g} | {row[1][0]:.3g} | "
              f"{row[1][1]:.3g} |", flush=True)
        del z

    print("\nKL(teacher's own distribution || the one rebuilt from the stored h_n), float64, per position", flush=True)


if __name__ == "__main__":
    main()
