"""One teacher forward -> numpy arrays: top-k logits and ids, lse per temperature, block outputs.

No file I/O here. Block outputs follow DESIGN.md section 3: layer 0 is the input of the first decoder
block (the embedding output, scaled where the architecture scales it), layer i >= 1 is the residual
stream after block i and before the final norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import PipelineError

LOGIT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise PipelineError(f"cannot find the decoder blocks of {type(model).__name__}")
    return layers


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def logits_to_numpy(logits: torch.Tensor, logit_dtype: str) -> np.ndarray:
    """[..., k] float -> storage array: float16 / float32, or bf16 bit patterns as uint16."""
    t = logits.to(LOGIT_DTYPES[logit_dtype])
    if logit_dtype == "bf16":
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def logits_from_numpy(arr: np.ndarray, logit_dtype: str) -> np.ndarray:
    """Inverse of logits_to_numpy, as float32."""
    if logit_dtype == "bf16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16).float().numpy()
    return arr.astype(np.float32)


def stored_lse(z: torch.Tensor, top: torch.Tensor, top_ids: torch.Tensor, stored: torch.Tensor,
               temperatures: list[float]) -> torch.Tensor:
    """The log-normaliser to store with the rounded top-k logits, per temperature -> [n_temps, N] float32.

    z [N, V] fp32 logits (overwritten: the top-k entries are set to -inf), top / top_ids [N, k] the top-k
    values (descending) and ids of z, stored [N, k] those values rounded to the stored dtype. With the
    true tail tau_T = sum_{j not in I} softmax(z / T)_j, the stored value is

        lse'_T = logsumexp(stored / T) - log(1 - tau_T)

    so that what a reader derives, 1 - sum_I exp(stored_i / T - lse'_T), is tau_T itself and every p_i
    keeps the rounding of its own logit only; lse'_T = logsumexp(z / T) when nothing is rounded (fp32).
    With m = max z / T, S_in = sum_I exp(z_i / T - m) (float64) and S_out the same sum outside I (float32,
    each term relative to m), log(1 - tau_T) = -log1p(S_out / S_in): no cancellation for confident tokens
    (never 1 - sum_I p_i) and no lse-sized absolute rounding (never a difference of two logsumexps). The
    error left is the float32 rounding of the result, 0.5 ulp(lse'_T), plus a few 2^-24 times tau_T.
    """
    out = torch.empty(len(temperatures), z.shape[0], dtype=torch.float32, device=z.device)
    if top.shape[-1] == 0:  # no top-k stored (sampled targets only): the full-vocabulary lse
        for ti, temp in enumerate(temperatures):
            out[ti] = torch.logsumexp(z / temp if temp != 1.0 else z, dim=-1)
        return out
    z.scatter_(-1, top_ids, float("-inf"))
    wide = "cpu" if z.device.type == "mps" else z.device  # [N, k] float64 work (MPS has no float64)
    top64, stored64 = top.to(wide, torch.float64), stored.to(wide, torch.float64)
    for ti, temp in enumerate(temperatures):
        m = top[:, :1] / temp  # [N, 1] fp32: every exponent below is <= 0
        s_out = torch.exp(z / temp - m).sum(-1).to(wide, torch.float64)  # 0 when k = V
        m64 = m.to(wide, torch.float64)
        s_in = torch.exp(top64 / temp - m64).sum(-1)
        lse = torch.logsumexp(stored64 / temp - m64, dim=-1) + m64.squeeze(-1) + torch.log1p(s_out / s_in)
        out[ti] = lse.to(out)
    return out


@dataclass
class Captured:
    topk_ids: np.ndarray  # [B, T, k] uint16 | uint32
    topk_logits: np.ndarray  # [B, T, k] storage dtype (see logits_to_numpy)
    lse: np.ndarray  # [n_temps, B, T] float32: the normaliser of the stored top-k logits (see stored_lse)
    hidden: dict[int, np.ndarray]  # layer -> [B, T, d] float32 (empty when encoded on the device)
    # with TeacherCapture(hidden_codec=...): the codec's arrays per layer, encoded where the teacher runs,
    # and each token's float64 sum of squares per layer [B, T] (what the manifest's mean square needs)
    encoded: dict[int, dict[str, np.ndarray]] | None = None
    token_squares: dict[int, np.ndarray] | None = None
    # with samples > 0 (pipeline/teacher/sampling.py): per position the distinct drawn ids sorted by logit,
    # how often each was drawn (0 = an empty slot; the counts sum to K) and the raw logits there
    sample_ids: np.ndarray | None = None  # [B, T, K] uint16 | uint32
    sample_counts: np.ndarray | None = None  # [B, T, K] uint8 (K <= 255) | uint16
    sample_logits: np.ndarray | None = None  # [B, T, K] storage dtype (see logits_to_numpy)


class TeacherCapture:
    """Hooks the chosen layers once; each call runs one forward and returns a `Captured`."""

    def __init__(
        self,
        model: torch.nn.Module,
        layers: list[int],
        topk: int,
        temperatures: list[float],
        logit_dtype: str = "fp16",
        head_chunk_tokens: int = 1024,
        hidden_codec: str | None = None,
        samples: int = 0,
        proposal_temperature: float = 1.0,
        sample_seed: int = 0,
    ):
        self.model = model
        self.layers = sorted(set(layers))
        self.blocks = decoder_layers(model)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.topk = topk
        self.temperatures = [float(t) for t in temperatures]
        self.logit_dtype = logit_dtype
        self.id_dtype = id_dtype(self.vocab_size)
        self.head_chunk_tokens = head_chunk_tokens
        self.codec = None
        if hidden_codec is not None:  # encode block outputs on the teacher's device, copy only the encoding
            from pipeline.cache.codecs import HIDDEN_CODECS

            self.codec = HIDDEN_CODECS.get(hidden_codec)
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        n = len(self.blocks)
        bad = [i for i in self.layers if not 0 <= i <= n]
        if bad:
            raise PipelineError(f"cache.layers: layer {bad[0]} is beyond the teacher's depth (0..{n})")
        # topk 0: no top-k targets (a cache of sampled logits only); samples 0: no draws
        self.samples, self.proposal_temperature, self.sample_seed = int(samples), float(proposal_temperature), int(sample_seed)
        if not (0 if self.samples else 1) <= topk <= self.vocab_size:
            raise PipelineError(f"cache.topk: {topk} must be between 1 and the vocabulary size {self.vocab_size}")
        if self.samples < 0:
            raise PipelineError(f"cache.samples: {samples} must be >= 1")
        if not self.proposal_temperature > 0:
            raise PipelineError(f"cache.proposal_temperature: {proposal_temperature} must be > 0")
        self._store: dict[int, torch.Tensor] = {}
        self._handles = []
        for i in self.layers:
            if i == 0:
                self._handles.append(self.blocks[0].register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            else:
                self._handles.append(self.blocks[i - 1].register_forward_hook(self._make_hook(i)))
        self._final_hidden: torch.Tensor | None = None

    def _pre_hook(self, module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        self._store[0] = h.detach()

    def _make_hook(self, layer: int):
        def hook(module, args, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            self._store[layer] = h.detach()

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 sequences: list[int] | None = None) -> Captured:
        """`sequences`: the global index of every row, which seeds its draws (needed when samples > 0)."""
        self._store = {}
        base = self.model.get_decoder()
        device = self.model.get_output_embeddings().weight.device
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
        out = base(input_ids=input_ids.to(device), attention_mask=attention_mask, use_cache=False)
        normed = out.last_hidden_state  # [B, T, d] after the final norm
        B, T, _ = normed.shape
        head = self.model.get_output_embeddings()
        flat = normed.reshape(B * T, -1)
        # top-k and lse stay on the head's device until the one copy of what is stored
        ids = torch.empty(B * T, self.topk, dtype=torch.long, device=device)
        vals = torch.empty(B * T, self.topk, dtype=LOGIT_DTYPES[self.logit_dtype], device=device)  # as stored
        lse = torch.empty(len(self.temperatures), B * T, dtype=torch.float32, device=device)
        sampler = self._sampler(sequences, B, T, device)  # None without draws
        # the LM head in token chunks: never more than one [chunk, V] logits tensor alive
        for s in range(0, B * T, self.head_chunk_tokens):
            z = head(flat[s : s + self.head_chunk_tokens]).float()  # [c, V]
            if self.softcap:
                z = torch.tanh(z / self.softcap) * self.softcap
            if sampler is not None:
                sampler(z, s)
            v, i = torch.topk(z, self.topk, dim=-1)
            vals[s : s + len(z)], ids[s : s + len(z)] = v, i  # rounded once, to the stored dtype
            lse[:, s : s + len(z)] = stored_lse(z, v, i, vals[s : s + len(z)].float(), self.temperatures)
        out = Captured(
            topk_ids=ids.reshape(B, T, self.topk).to(torch.int32).cpu().numpy().astype(self.id_dtype),
            topk_logits=logits_to_numpy(vals.reshape(B, T, self.topk).cpu(), self.logit_dtype),
            lse=lse.reshape(len(self.temperatures), B, T).cpu().numpy(),
            hidden={},
        )
        if sampler is not None:
            self._store_samples(out, sampler, B, T)
        if self.codec is None:
            out.hidden = {i: self._store[i].float().cpu().numpy() for i in self.layers}
        else:
            out.encoded, out.token_squares = {}, {}
            for i in self.layers:
                h = self._store[i].float()
                out.encoded[i] = self.codec.encode_torch(h)
                out.token_squares[i] = h.double().square().sum(-1).cpu().numpy()  # [B, T]
        return out

    def _sampler(self, sequences: list[int] | None, B: int, T: int, device):
        if not self.samples:
            return None
        from pipeline.teacher.sampling import SampleBuffers, sequence_uniforms

        if sequences is None or len(sequences) != B:
            raise ValueError(f"drawing samples needs the global index of each of the {B} rows, got {sequences!r}")
        uniforms = torch.from_numpy(sequence_uniforms(self.sample_seed, list(sequences), T, self.samples))
        return SampleBuffers(uniforms.reshape(B * T, self.samples).to(device), self.proposal_temperature)

    def _store_samples(self, out: Captured, sampler, B: int, T: int) -> None:
        from pipeline.teacher.sampling import count_dtype

        shape = (B, T, self.samples)
        out.sample_ids = sampler.ids.reshape(shape).to(torch.int32).cpu().numpy().astype(self.id_dtype)
        out.sample_counts = sampler.counts.reshape(shape).cpu().numpy().astype(count_dtype(self.samples))
        out.sample_logits = logits_to_numpy(sampler.logits.reshape(shape).cpu(), self.logit_dtype)
