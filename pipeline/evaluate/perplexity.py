"""Held-out perplexity and KL to the teacher, over token rows (packed, or padded with lengths).

Two sources of the teacher side:
- a live reference model (`heldout_scores`): KL over the full vocabulary; used to score pruning
  candidates, and by `distill eval --text FILE --reference SRC`;
- a cache's held-out split (`cache_heldout_scores`): no teacher weights; KL(teacher || model) at T = 1 from
  the cached top-k logits and their stored lse (which keeps the exact tail), on the (k+1)-bucket
  coarsening (the top-k ids plus one exact tail bucket; docs/architecture.md, sections 6 and 12). By the
  data-processing inequality that is <= the full KL, and equal to it at k = vocabulary size.

Both average over valid next-token positions: t < T-1 in packed rows, t < length-1 in padded ones.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.errors import PipelineError
from pipeline.targets import find_temperature

KL_TEMPERATURE = 1.0


def _perplexity(mean_nll: float) -> float:
    """exp(mean NLL); inf (not OverflowError) past float range, NaN stays NaN (callers map both to null)."""
    return math.exp(mean_nll) if mean_nll < 709.0 else (math.inf if mean_nll == mean_nll else math.nan)


def _batch_masks(ids: torch.Tensor, lengths: np.ndarray | None, s: int, batch_size: int):
    """(attention mask or None, valid next-token positions [B, T-1])."""
    if lengths is None:
        return None, torch.ones_like(ids[:, 1:], dtype=torch.bool)
    lens = torch.as_tensor(lengths[s : s + batch_size], device=ids.device)
    valid = torch.arange(ids.shape[1], device=ids.device)[None, :] < lens[:, None]  # [B, T]
    return valid.long(), valid[:, 1:]


@torch.no_grad()
def heldout_scores(
    reference: nn.Module | None,
    models: dict[str, nn.Module],
    input_ids: np.ndarray,
    lengths: np.ndarray | None,
    batch_size: int,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Per model: {"perplexity", "kl", "tokens"}, KL(reference || model) at T=1 over valid next-token positions.

    The reference (the unpruned model) runs once per batch; every model is scored against it in turn,
    so only one batch of [B, T, V] log-probs per model lives at a time. The result includes "reference".
    With reference=None only perplexities are computed ("kl" is None).
    """
    first = reference if reference is not None else next(iter(models.values()))
    device = next(first.parameters()).device
    names = (["reference"] if reference is not None else []) + list(models)
    nll = dict.fromkeys(names, 0.0)
    kl = dict.fromkeys(names, 0.0)
    count = 0
    for s in tqdm(range(0, len(input_ids), batch_size), desc="held-out scoring", unit="batch", disable=not progress):
        ids = torch.as_tensor(input_ids[s : s + batch_size], dtype=torch.long, device=device)  # [B, T]
        attn, target_ok = _batch_masks(ids, lengths, s, batch_size)
        targets = ids[:, 1:][target_ok]  # [M]
        ref_logp = ref_p = None
        if reference is not None:
            ref_logits = reference(input_ids=ids, attention_mask=attn, use_cache=False).logits
            ref_logp = torch.log_softmax(ref_logits[:, :-1].float(), -1)[target_ok]  # [M, V]
            ref_p = ref_logp.exp()
        for name in names:
            if name == "reference":
                logp = ref_logp
            else:
                logits = models[name](input_ids=ids, attention_mask=attn, use_cache=False).logits
                logp = torch.log_softmax(logits[:, :-1].float(), -1)[target_ok]  # [M, V]
                if ref_p is not None:
                    kl[name] += float((ref_p * (ref_logp - logp)).sum())
            nll[name] -= float(logp.gather(1, targets[:, None]).sum())
        count += int(target_ok.sum())
    if count == 0:
        raise PipelineError("no valid next-token positions to score (every row is shorter than 2 tokens)")
    return {n: {"perplexity": _perplexity(nll[n] / count), "kl": kl[n] / count if reference is not None else None,
                "tokens": count} for n in names}


@torch.no_grad()
def cache_heldout_scores(model: nn.Module, cache, batch_size: int = 4, progress: bool = True) -> dict:
    """{"perplexity", "kl_to_teacher", "tokens", "sequences", "kl_support", "per_sequence"} of `model` on the
    held-out split of an open cache (pipeline.cache.open_cache); kl_to_teacher is None when T = 1 was not cached.
    per_sequence holds, in held-out order, each sequence's summed NLL, summed KL and scored positions: two
    models scored on one cache pair up sequence by sequence (pipeline.evaluate.metrics.paired_heldout).

    A cache with exact targets opened with its layer n (`open_cache(dir, layers=[n])`) gives the exact KL
    over the whole vocabulary, from the teacher's logits rebuilt from layer n; with top-k targets too, the
    top-k + tail bucket KL is kept beside it as kl_to_teacher_topk (per_sequence kl_topk)."""
    from pipeline.losses.logits import exact_logits_loss, logits_loss

    rows = list(cache.indices("heldout"))
    if not rows:
        raise PipelineError(f"{cache.root} has no held-out sequences (it was built with data.heldout_fraction 0)")
    temp = find_temperature(cache.temperatures, KL_TEMPERATURE)
    device = next(model.parameters()).device
    n = cache.exact_layer
    head = cache.teacher_head().to(device) if n is not None and n in cache.decoded_layers else None
    topk_temp = temp if cache.topk else None  # the top-k buckets' KL needs T = 1 cached
    # the exact KL needs no cached temperature; without it a cache of sampled targets only has no KL to report
    temp = KL_TEMPERATURE if head is not None else topk_temp
    per_seq: dict[str, list] = {"nll": [], "kl": [], "tokens": []}  # sums per held-out sequence; totals below
    if head is not None and topk_temp is not None:
        per_seq["kl_topk"] = []
    for s in tqdm(range(0, len(rows), batch_size), desc="held-out (cache)", unit="batch", disable=not progress):
        items = [cache[i] for i in rows[s : s + batch_size]]
        ids = torch.as_tensor(np.stack([r["input_ids"] for r in items]), dtype=torch.long, device=device)  # [B, T]
        lengths = np.array([r["length"] for r in items]) if "length" in items[0] else None
        attn, target_ok = _batch_masks(ids, lengths, 0, len(items))
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()  # [B, T-1, V]
        logp = torch.log_softmax(logits, -1)
        row_nll = -(logp.gather(-1, ids[:, 1:, None]).squeeze(-1) * target_ok).sum(1)  # [B]
        for b, item in enumerate(items):
            m_b = int(target_ok[b].sum())
            per_seq["nll"].append(float(row_nll[b]))
            per_seq["tokens"].append(m_b)
            if temp is None:
                continue
            row_kl = row_topk = 0.0
            # the teacher's distribution for the token after position t sits at position t
            if m_b and topk_temp is not None:
                teacher = [torch.tensor(a[:-1], device=device)
                           for a in (item["topk_ids"], item["topk_logits"], item["lse"][topk_temp])]
                mean = logits_loss("kl", logits[b], *teacher, target_ok[b], KL_TEMPERATURE, tail="bucket")
                row_topk = float(mean) * m_b
            if m_b and head is not None:
                keep = target_ok[b].bool()
                z_t = head.logits(torch.as_tensor(item["hidden"][n][:-1], device=device)[keep])
                row_kl = float(exact_logits_loss("kl", logits[b][keep], z_t, KL_TEMPERATURE)) * m_b
            else:
                row_kl = row_topk
            per_seq["kl"].append(row_kl)
            if "kl_topk" in per_seq:
                per_seq["kl_topk"].append(row_topk)
    count = sum(per_seq["tokens"])
    if count == 0:
        raise PipelineError(f"{cache.root}: no valid next-token positions in the held-out split")
    out = {
        "perplexity": _perplexity(sum(per_seq["nll"]) / count),
        "kl_to_teacher": sum(per_seq["kl"]) / count if temp is not None else None,
        "tokens": count,
        "sequences": len(rows),
        "kl_support": ("full vocabulary (exact targets)" if head is not None else f"top-{cache.topk} + tail bucket"
                       ) if temp is not None else None,
        "per_sequence": {**per_seq, "kl": per_seq["kl"] if temp is not None else None},
    }
    if "kl_topk" in per_seq:
        out["kl_to_teacher_topk"] = sum(per_seq["kl_topk"]) / count
    return out
