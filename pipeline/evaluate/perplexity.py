"""Held-out perplexity and KL to a reference model, over token rows (packed or padded with lengths).

Used to score pruning candidates and to show recovery (demo: teacher, student before and after training).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def heldout_scores(
    reference: nn.Module,
    models: dict[str, nn.Module],
    input_ids: np.ndarray,
    lengths: np.ndarray | None,
    batch_size: int,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Per model: held-out perplexity and mean KL(reference || model) at T=1 over valid next-token positions.

    The reference (the unpruned model) runs once per batch; every model is scored against it in turn,
    so only one batch of [B, T, V] log-probs per model lives at a time. The result includes "reference".
    """
    device = next(reference.parameters()).device
    names = ["reference", *models]
    nll = dict.fromkeys(names, 0.0)
    kl = dict.fromkeys(names, 0.0)
    count = 0
    for s in tqdm(range(0, len(input_ids), batch_size), desc="held-out scoring", unit="batch", disable=not progress):
        ids = torch.as_tensor(input_ids[s : s + batch_size], dtype=torch.long, device=device)  # [B, T]
        if lengths is None:
            valid = torch.ones_like(ids, dtype=torch.bool)
            attn = None
        else:
            lens = torch.as_tensor(lengths[s : s + batch_size], device=device)
            valid = torch.arange(ids.shape[1], device=device)[None, :] < lens[:, None]
            attn = valid.long()
        target_ok = valid[:, 1:]  # [B, T-1] positions whose next token is real
        targets = ids[:, 1:][target_ok]  # [M]
        ref_logp = torch.log_softmax(reference(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float(), -1)[target_ok]  # [M, V]
        ref_p = ref_logp.exp()
        for name in names:
            if name == "reference":
                logp = ref_logp
            else:
                logits = models[name](input_ids=ids, attention_mask=attn, use_cache=False).logits
                logp = torch.log_softmax(logits[:, :-1].float(), -1)[target_ok]  # [M, V]
                kl[name] += float((ref_p * (ref_logp - logp)).sum())
            nll[name] -= float(logp.gather(1, targets[:, None]).sum())
        count += int(target_ok.sum())
    return {n: {"perplexity": math.exp(nll[n] / count), "kl": kl[n] / count} for n in names}
