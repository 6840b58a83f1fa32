"""The chunked head loss inside a sharded student, on each of 2 processes (torchrun, gloo):
`python -m torch.distributed.run --nproc_per_node 2 tests/losses/sharded_head_worker.py OUT.pt`.

A tiny untied Llama is sharded as training shards it (pipeline.train.fsdp.shard: a unit per block, the root unit
holding the head kept gathered from its forward to its backward). Both processes feed the same rows, so FSDP's
average of the two head gradients is that gradient exactly (g + g and / 2 are exact in fp32). For each case the
process records the final hidden states h [M, d] the forward gave, the head weight W [V, d] the loss read, the
loss and its parts, d loss / d h, and d loss / d W gathered whole; and what the loss did to the sharding: the
weight it read was whole (FSDP's own gather for the forward), no collective ran inside the loss, and the head's
gradient arrived as a DTensor shard of V / 2 rows. Rank 0 saves it all to OUT.pt."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from pipeline.blocks import is_sharded
from pipeline.head import final_hidden, head_spec
from pipeline.losses.chunked import VocabTerms, chunked_head_loss
from pipeline.targets import TopkTargets
from pipeline.train.fsdp import FsdpSettings, shard
from tests.train.conftest import tiny_llama

CASES = [("kl", "bucket", 0.3, 0.7, 2.0), ("jsd", "renormalize", 0.0, 1.0, 1.0)]  # divergence, tail, alpha, beta, T
B, T_LEN, K, CHUNK = 2, 16, 8, 8
COLLECTIVES = ("all_gather_into_tensor", "all_gather", "all_reduce", "reduce_scatter_tensor", "broadcast")


class _Counted:
    """Counts calls of torch.distributed's collectives while active."""

    def __enter__(self):
        self.calls, self._saved = 0, {}
        for name in COLLECTIVES:
            original = self._saved[name] = getattr(dist, name)

            def counted(*args, _original=original, **kwargs):
                self.calls += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)


def run_case(model, divergence: str, tail: str, alpha: float, beta: float, temperature: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)  # the same rows on every process
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (B, T_LEN), generator=g)
    teacher = torch.randn(B * T_LEN, vocab, generator=g, dtype=torch.float64) * 3
    topk_logits, topk_ids = teacher.topk(K, dim=-1)
    lse = torch.logsumexp(teacher / temperature, dim=-1)
    targets = torch.randint(0, vocab, (B * T_LEN,), generator=g)
    kept = {}
    hook = model.get_decoder().register_forward_hook(lambda m, a, out: kept.update(h=final_hidden(out)))
    model(input_ids=ids, use_cache=False, logits_to_keep=1)
    hook.remove()
    h = kept["h"].reshape(B * T_LEN, -1)
    h.retain_grad()
    head = head_spec(model)[0]
    terms = VocabTerms(alpha=alpha, beta=beta, targets=targets, divergence=divergence, tail=tail, args={},
                       temperature=temperature, teacher=TopkTargets(topk_ids, topk_logits.float(), lse.float()))
    weight_whole = not is_sharded(head.weight) and tuple(head.weight.shape) == (vocab, model.config.hidden_size)
    w = head.weight.detach().clone()
    with _Counted() as counted:
        loss, parts = chunked_head_loss(h, head, terms, CHUNK)
    loss.backward()
    grad_w = model.get_output_embeddings().weight.grad
    out = {"case": (divergence, tail, alpha, beta, temperature), "h": h.detach().clone(), "w": w,
           "targets": targets, "ids": topk_ids, "topk_logits": topk_logits.float(), "lse": lse.float(),
           "loss": loss.detach(), "ce": parts["loss_ce"], "kl": parts["loss_kl"], "grad_h": h.grad.clone(),
           "grad_w": grad_w.full_tensor(), "weight_whole_in_loss": weight_whole,
           "collectives_in_loss": counted.calls, "grad_w_sharded": is_sharded(grad_w),
           "grad_w_local_rows": grad_w.to_local().shape[0]}
    model.zero_grad(set_to_none=True)
    return out


def main(path: str) -> None:
    dist.init_process_group("gloo")
    model = tiny_llama(2, 24, seed=1)
    shard(model, torch.nn.ModuleDict(), FsdpSettings(), torch.device("cpu"))
    results = [run_case(model, *case, seed=i) for i, case in enumerate(CASES)]
    gathered = [None, None]
    dist.all_gather_object(gathered, [(r["loss"], r["grad_w"]) for r in results])
    for r, theirs in zip(results, gathered[1]):  # both processes computed the same loss and gradient
        r["same_on_both"] = torch.equal(r["loss"], theirs[0]) and torch.equal(r["grad_w"], theirs[1])
    if dist.get_rank() == 0:
        torch.save(results, path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
