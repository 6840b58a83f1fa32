"""How much each block, MLP neuron, query head and hidden channel matters, measured on calibration text.

One pass over the calibration rows (the base model only: no LM head, no [B, T, V] logits) records:

- the mean cosine between the residual stream at every pair of block boundaries (0 = embedding output,
  i = output of block i, before the final norm; docs/architecture.md, section 2), so the importance of one block
  (1 - cos(in, out), "block influence") and of any run of adjacent blocks come from one matrix;
- per block, the mean square of every MLP neuron's activation (the input of down_proj) and of every
  query head's contribution to o_proj's output;
- per norm module, the mean square of every output channel (Minitron's hidden-channel importance).

Width scores turn these into "higher = keep" tensors; the kinds are registered in WIDTH_IMPORTANCE.
All means run over valid tokens only (padded rows carry their length).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.registry import Registry
from pipeline.student.architectures import ArchSpec, head_dim
from pipeline.blocks import decoder_layers


@dataclass
class CalibrationStats:
    boundary_cos: np.ndarray  # [L+1, L+1] float64, mean cos(h_i, h_j) over valid tokens; h_0 = embeddings
    neuron_sq: list[torch.Tensor]  # L x [I]: mean a^2, a = act(gate(x)) * up(x) (down_proj input)
    head_sq: list[torch.Tensor]  # L x [n_heads]: mean ||W_o[:, head] z_head||^2 (head's share of o_proj output)
    norm_sq: dict[str, torch.Tensor]  # norm module name -> [H]: mean y^2 of its output
    tokens: int  # valid calibration tokens


@dataclass
class BlockScores:
    """Block influence from the boundary cosines; blocks are 1-based as everywhere (docs/architecture.md, section 2)."""

    boundary_cos: np.ndarray  # [L+1, L+1]

    @property
    def num_layers(self) -> int:
        return len(self.boundary_cos) - 1

    def block(self) -> np.ndarray:
        """[L] importance of block i+1 = 1 - mean cos(block input, block output)."""
        return 1.0 - np.diagonal(self.boundary_cos, offset=1)

    def run(self, start: int, n: int) -> float:
        """Importance of blocks start..start+n-1 together: 1 - mean cos(input of start, output of the last)."""
        return float(1.0 - self.boundary_cos[start - 1, start - 1 + n])


def _valid_mask(lengths: np.ndarray | None, batch: slice, shape: tuple[int, int]) -> torch.Tensor:
    """[B, T] bool, True at real tokens."""
    if lengths is None:
        return torch.ones(shape, dtype=torch.bool)
    lens = torch.as_tensor(lengths[batch], dtype=torch.long)
    return torch.arange(shape[1])[None, :] < lens[:, None]


def _first_tensor(x) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


@torch.no_grad()
def collect_stats(
    model: nn.Module,
    spec: ArchSpec,
    input_ids: np.ndarray,
    lengths: np.ndarray | None,
    batch_size: int,
    progress: bool = True,
) -> CalibrationStats:
    """One pass of `model.model` over `input_ids` [N, T] with hooks; see the module docstring."""
    layers = decoder_layers(model)
    n_layers = len(layers)
    cfg = model.config
    n_heads, hd = cfg.num_attention_heads, head_dim(cfg)

    cur: dict[str, torch.Tensor] = {}  # "mask": [B, T] bool of the running batch
    boundaries: list[torch.Tensor | None] = [None] * (n_layers + 1)  # each [B, T, H]
    neuron_sq = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in layers]
    head_sq = [torch.zeros(n_heads, dtype=torch.float64) for _ in layers]
    norm_sq: dict[str, torch.Tensor] = {}
    # Gram matrices of o_proj per head: ||W_h z||^2 = z^T (W_h^T W_h) z, [n_heads, hd, hd]
    grams = []
    for layer in layers:
        w = layer.self_attn.o_proj.weight.detach().float().view(-1, n_heads, hd)  # [H, n_heads, hd]
        grams.append(torch.einsum("hnd,hne->nde", w, w))

    def masked_sum_sq(x: torch.Tensor) -> torch.Tensor:
        # x [B, T, C] -> [C] sum of squares over valid tokens
        m = cur["mask"]
        return (x.float()[m] ** 2).sum(0).double()

    handles = []

    def embed_hook(module, args, kwargs):
        boundaries[0] = (args[0] if args else kwargs["hidden_states"]).detach()

    handles.append(layers[0].register_forward_pre_hook(embed_hook, with_kwargs=True))
    for i, layer in enumerate(layers):

        def out_hook(module, args, output, i=i):
            boundaries[i + 1] = _first_tensor(output).detach()

        def down_hook(module, args, i=i):
            neuron_sq[i] += masked_sum_sq(args[0])

        def o_hook(module, args, i=i):
            z = args[0].float()  # [B, T, n_heads * hd]
            z = z[cur["mask"]].view(-1, n_heads, hd)  # [M, n_heads, hd] valid tokens
            head_sq[i] += torch.einsum("mnd,nde,mne->n", z, grams[i], z).double()

        handles.append(layer.register_forward_hook(out_hook))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(down_hook))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(o_hook))

    norm_modules = {f"model.layers.{i}.{n}": getattr(layer, n) for i, layer in enumerate(layers) for n in spec.layer_norms}
    norm_modules["model.norm"] = model.model.norm
    for name, module in norm_modules.items():

        def norm_hook(module, args, output, name=name):
            s = masked_sum_sq(_first_tensor(output))
            norm_sq[name] = norm_sq[name] + s if name in norm_sq else s

        handles.append(module.register_forward_hook(norm_hook))

    cos_sum = np.zeros((n_layers + 1, n_layers + 1))
    tokens = 0
    device = next(model.parameters()).device
    try:
        starts = range(0, len(input_ids), batch_size)
        for s in tqdm(starts, desc="calibration", unit="batch", disable=not progress):
            rows = slice(s, s + batch_size)
            ids = torch.as_tensor(input_ids[rows], dtype=torch.long, device=device)  # [B, T]
            mask = _valid_mask(lengths, rows, tuple(ids.shape))
            cur["mask"] = mask.to(device)
            attn = None if lengths is None else mask.long().to(device)
            model.model(input_ids=ids, attention_mask=attn, use_cache=False)
            # [L+1, M, H] unit vectors of the residual stream at every boundary, valid tokens only
            h = torch.stack([b.float()[cur["mask"]] for b in boundaries])
            h = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            cos_sum += torch.einsum("imh,jmh->ij", h, h).double().cpu().numpy()
            tokens += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()

    return CalibrationStats(
        boundary_cos=cos_sum / max(tokens, 1),
        neuron_sq=[x.cpu() / max(tokens, 1) for x in neuron_sq],
        head_sq=[x.cpu() / max(tokens, 1) for x in head_sq],
        norm_sq={k: v.cpu() / max(tokens, 1) for k, v in norm_sq.items()},
        tokens=tokens,
    )


# ----------------------------------------------------------------------------- width scores


@dataclass
class WidthScores:
    """Higher = keep. Per-block lists are indexed by original block - 1."""

    neurons: list[torch.Tensor]  # L x [I]
    heads: list[torch.Tensor]  # L x [n_heads]
    channels: list[torch.Tensor]  # L x [H]: this block's share of the hidden-channel score
    channels_global: torch.Tensor  # [H]: share of the embeddings / final norm (kept whatever blocks go)

    def channel_scores(self, kept_layers: list[int]) -> torch.Tensor:
        """[H] summed over the kept blocks (1-based) only: a removed block's norms should not vote."""
        total = self.channels_global.clone()
        for b in kept_layers:
            total += self.channels[b - 1]
        return total


WidthImportance = Callable[[nn.Module, ArchSpec, "CalibrationStats | None"], WidthScores]
WIDTH_IMPORTANCE: Registry[WidthImportance] = Registry("width importance")


def _mlp_weights(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate [I, H], up [I, H], down [H, I] as float32."""
    mlp = layer.mlp
    return mlp.gate_proj.weight.detach().float(), mlp.up_proj.weight.detach().float(), mlp.down_proj.weight.detach().float()


@WIDTH_IMPORTANCE.register("activation")
@torch.no_grad()
def activation_importance(model: nn.Module, spec: ArchSpec, stats: CalibrationStats | None) -> WidthScores:
    """Calibration activations.

    neuron i: RMS of its contribution to the MLP output, sqrt(mean a_i^2) * ||W_down[:, i]||
              (a neuron whose gate/up rows or down column are zero scores exactly 0);
    head h:   RMS norm of its contribution to o_proj's output;
    channel c: sum over norm modules of sqrt(mean y_c^2) (Minitron: aggregate the norm outputs).
    """
    if stats is None:
        raise ValueError("activation importance needs calibration statistics")
    layers = decoder_layers(model)
    neurons, heads, channels = [], [], []
    for i, layer in enumerate(layers):
        _, _, down = _mlp_weights(layer)
        neurons.append(stats.neuron_sq[i].float().sqrt() * down.norm(dim=0))
        heads.append(stats.head_sq[i].float().sqrt())
        channels.append(sum(stats.norm_sq[f"model.layers.{i}.{n}"].float().sqrt() for n in spec.layer_norms))
    return WidthScores(neurons, heads, channels, stats.norm_sq["model.norm"].float().sqrt())


@WIDTH_IMPORTANCE.register("magnitude")
@torch.no_grad()
def magnitude_importance(model: nn.Module, spec: ArchSpec, stats: CalibrationStats | None) -> WidthScores:
    """Weights only (no calibration needed for width).

    neuron i: ||W_gate[i]|| * ||W_up[i]|| * ||W_down[:, i]||  (zero when any of the three is zero);
    head h:   ||W_q[head rows]|| * ||W_o[:, head columns]||;
    channel c: L2 norm of every weight that reads or writes channel c (embedding column, projection
              columns/rows); norm scales are left out (they are rescalings, not information).
    """
    cfg = model.config
    n_heads, hd = cfg.num_attention_heads, head_dim(cfg)
    neurons, heads, channels = [], [], []
    for layer in decoder_layers(model):
        gate, up, down = _mlp_weights(layer)
        neurons.append(gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0))
        attn = layer.self_attn
        q = attn.q_proj.weight.detach().float().view(n_heads, hd, -1)  # [n_heads, hd, H]
        o = attn.o_proj.weight.detach().float().view(-1, n_heads, hd)  # [H, n_heads, hd]
        heads.append(q.pow(2).sum((1, 2)).sqrt() * o.pow(2).sum((0, 2)).sqrt())
        sq = gate.pow(2).sum(0) + up.pow(2).sum(0) + down.pow(2).sum(1)  # [H]
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            sq += proj.weight.detach().float().pow(2).sum(0)
        sq += attn.o_proj.weight.detach().float().pow(2).sum(1)
        channels.append(sq.sqrt())
    emb = model.model.embed_tokens.weight.detach().float().pow(2).sum(0)  # [H]
    if not cfg.tie_word_embeddings:
        emb += model.lm_head.weight.detach().float().pow(2).sum(0)
    return WidthScores(neurons, heads, channels, emb.sqrt())
