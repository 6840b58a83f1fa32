"""One teacher forward -> numpy arrays: top-k logits and ids, lse per temperature, block outputs.

No file I/O here. Block outputs follow docs/architecture.md, section 2: layer 0 is the input of the first
decoder block (the embedding output, scaled where the architecture scales it), layer i >= 1 is the
residual stream after block i and before the final norm.

`submit` launches a batch and returns at once; `result()` of what it returns waits for that batch. On a
GPU the batch's outputs are copied to pinned host memory on a side stream, so a caller that submits batch
i+1 before asking for batch i's result overlaps the copies (and the host's share of the work) with the
next forward. On a CPU the same calls run in order. Either way the values are the same: the device does
fp32 work only, and the few float64 steps (the stored lse over the top-k) run on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.blocks import decoder_layers
from pipeline.cache.codecs import (
    HIDDEN_CODECS,
    count_dtype,
    host_array,
    id_dtype,
    logits_from_numpy,
)
from pipeline.dtypes import LOGIT_DTYPES
from pipeline.errors import PipelineError
from pipeline.head import check_capture, head_spec

CPU_HEAD_CHUNK = 1024  # LM-head tokens per chunk on a CPU (on a GPU: sized by free memory, _head_chunk)
CHECK_TOKENS = 128  # tokens the build's first-batch check runs through the model's own forward (~1% of a batch)


def tail_sums(z: torch.Tensor, top: torch.Tensor, top_ids: torch.Tensor, temperatures: list[float],
              buffer: torch.Tensor | None = None) -> torch.Tensor:
    """The device's part of `stored_lse`: S_out,T = sum over ids outside the top-k of exp(z / T - m_T), with
    m_T = max z / T, per temperature -> [n_temps, N] fp32. z [N, V] fp32 is overwritten (the top-k entries
    become -inf, the rest z - max z); top / top_ids [N, k] are its top-k values (descending) and ids;
    `buffer` (at least z's size) is reused for the exponentials instead of a new [N, V] tensor per
    temperature. Each exponent is computed as (z - max z) / T, which equals z / T - max z / T to the bit
    for a power-of-two T (halving is exact) and within one rounding of it otherwise."""
    z.scatter_(-1, top_ids, float("-inf"))
    z.sub_(top[:, :1])  # <= 0 everywhere: no exponential overflows
    return exp_sums(z, temperatures, buffer)  # 0 when k = V


def exp_sums(d: torch.Tensor, temperatures: list[float], buffer: torch.Tensor | None = None) -> torch.Tensor:
    """sum over each row of exp(d / T) per temperature -> [n_temps, N] fp32, for d [N, V] = z - max z (<= 0,
    -inf where excluded); `buffer` (at least d's size) holds the exponentials instead of a new tensor per T."""
    out = torch.empty(len(temperatures), d.shape[0], dtype=torch.float32, device=d.device)
    e = torch.empty_like(d) if buffer is None else buffer.view(-1)[: d.numel()].view(d.shape)
    for ti, temp in enumerate(temperatures):
        if temp == 1.0:
            torch.exp(d, out=e)
        else:
            torch.div(d, temp, out=e).exp_()
        out[ti] = e.sum(-1)
    return out


def finish_lse(top: torch.Tensor, stored: torch.Tensor, s_out: torch.Tensor, temperatures: list[float]) -> torch.Tensor:
    """The host's part of `stored_lse`, in float64 on [N, k]: top [N, k] fp32, stored [N, k] the stored values
    as fp32, s_out [n_temps, N] from tail_sums -> [n_temps, N] fp32."""
    top, stored, s_out = top.cpu(), stored.cpu(), s_out.cpu()
    out = torch.empty(len(temperatures), top.shape[0], dtype=torch.float32)
    top64, stored64 = top.double(), stored.double()
    for ti, temp in enumerate(temperatures):
        m64 = top64[:, :1] / temp  # [N, 1]: every exponent below is <= 0 (= tail_sums' max for a power-of-two T)
        s_in = torch.exp(top64 / temp - m64).sum(-1)
        lse = torch.logsumexp(stored64 / temp - m64, dim=-1) + m64.squeeze(-1) + torch.log1p(s_out[ti].double() / s_in)
        out[ti] = lse.float()
    return out


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
    S_out is the device's work (tail_sums, fp32 over the vocabulary); the rest runs on the host
    (finish_lse, float64 over the top-k).
    """
    if top.shape[-1] == 0:  # no top-k stored (sampled targets only): the full-vocabulary lse
        return torch.stack([torch.logsumexp(z / t if t != 1.0 else z, dim=-1) for t in temperatures]).float()
    return finish_lse(top, stored, tail_sums(z, top, top_ids, temperatures), temperatures)


@dataclass
class Captured:
    topk_ids: np.ndarray | None  # [B, T, k] uint16 | uint32 (None without top-k targets)
    topk_logits: np.ndarray | None  # [B, T, k] storage dtype (dtypes.STORED_LOGIT_DTYPES)
    lse: np.ndarray  # [n_temps, B, T] float32: the normaliser of the stored top-k logits (see stored_lse)
    hidden: dict[int, np.ndarray]  # layer -> [B, T, d] float32 (empty when encoded on the device)
    # with TeacherCapture(hidden_codec=...): the codec's arrays per layer, encoded where the teacher runs,
    # and each token's sum of squares per layer [B, T] as float64 (what the manifest's mean square needs)
    encoded: dict[int, dict[str, np.ndarray]] | None = None
    token_squares: dict[int, np.ndarray] | None = None
    # with samples > 0 (pipeline/teacher/sampling.py): per position the distinct drawn ids sorted by logit,
    # how often each was drawn (0 = an empty slot; the counts sum to K) and the raw logits there
    sample_ids: np.ndarray | None = None  # [B, T, K] uint16 | uint32
    sample_counts: np.ndarray | None = None  # [B, T, K] uint8 (K <= 255) | uint16
    sample_logits: np.ndarray | None = None  # [B, T, K] storage dtype


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on the teacher's device; to a GPU through pinned memory, so the copy does not wait for
    the work already queued there (the previous batch)."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class Launched:
    """A submitted batch: its outputs on their way to the host. `result()` waits for them and finishes."""

    def __init__(self, capture: "TeacherCapture", host: dict, event, shape: tuple[int, int]):
        self._capture, self._host, self._event, self._shape = capture, host, event, shape

    def result(self) -> Captured:
        if self._event is not None:
            self._event.synchronize()
        return self._capture._finish(self._host, self._shape)


class TeacherCapture:
    """Hooks the chosen layers once; `submit` runs one forward (`__call__` = submit + result)."""

    def __init__(
        self,
        model: torch.nn.Module,
        layers: list[int],
        topk: int,
        temperatures: list[float],
        logit_dtype: str = "fp16",
        head_chunk_tokens: int | None = None,
        hidden_codec: str | None = None,
        samples: int = 0,
        proposal_temperature: float = 1.0,
        sample_seed: int = 0,
        layer_codecs: dict[int, str] | None = None,
        head_shard=None,
        keep_hidden: bool = True,
    ):
        self.model = model
        # a tensor-parallel teacher (vocab_parallel.HeadShard): this rank's rows of the head, its group and the
        # vocabulary split; the head chunk's logits are then this rank's ids only (vocab_parallel.parallel_head)
        self.head_shard = head_shard
        self.layers = sorted(set(layers))
        self.blocks = decoder_layers(model)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.topk = topk
        self.temperatures = [float(t) for t in temperatures]
        self.logit_dtype = logit_dtype
        self.id_dtype = id_dtype(self.vocab_size)
        self.head_chunk_tokens = head_chunk_tokens  # None: by device (_head_chunk)
        # encode block outputs on the teacher's device, copy only the encoding
        self.codec = HIDDEN_CODECS.get(hidden_codec) if hidden_codec is not None else None
        # per layer, where a layer's codec is another than hidden_codec (exact targets' layer n)
        self.codecs = {} if self.codec is None else {
            i: HIDDEN_CODECS.get((layer_codecs or {}).get(i, hidden_codec)) for i in self.layers}
        self.head_spec, why = head_spec(model)  # the final-logit transform, applied to each chunk of head logits
        if self.head_spec is None:
            raise PipelineError(f"teacher: cannot reproduce its logits: {why}")
        n = len(self.blocks)
        bad = [i for i in self.layers if not 0 <= i <= n]
        if bad:
            raise PipelineError(f"cache.layers: layer {bad[0]} is beyond the teacher's depth (0..{n})")
        if not keep_hidden:  # a rank of a tensor-parallel group that does not write: the layers checked, none kept
            self.layers, self.codecs = [], {}
        # topk 0: no top-k targets (a cache of sampled or exact targets only; the lse is then the full
        # vocabulary's); samples 0: no draws
        self.samples, self.proposal_temperature, self.sample_seed = int(samples), float(proposal_temperature), int(sample_seed)
        if not 0 <= topk <= self.vocab_size:
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
        self._copy_stream = None  # CUDA: the side stream of the device-to-host copies
        self._work: torch.Tensor | None = None  # the tail sums' work buffer (_buffer)

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
        self._work = None

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 sequences: list[int] | None = None) -> Captured:
        return self.submit(input_ids, attention_mask, sequences).result()

    def _head_chunk(self, tokens: int, device: torch.device) -> int:
        """LM-head tokens per chunk: as given, else 1,024 on a CPU and, on a GPU, what a sixteenth of the
        device's total memory holds as three [chunk, V] fp32 buffers (the logits and the temporaries of top-k
        and lse). From the total, not the free memory: the chunk sets the head matmul's shape, whose kernels
        decide the logits' low bits, so it must not change from batch to batch or run to run."""
        if self.head_chunk_tokens:
            return self.head_chunk_tokens
        if device.type != "cuda":
            return CPU_HEAD_CHUNK
        total = torch.cuda.get_device_properties(device).total_memory
        return max(1, min(tokens, total // 16 // (3 * 4 * self.vocab_size)))

    @torch.inference_mode()
    def submit(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               sequences: list[int] | None = None) -> Launched:
        """Launch one batch. `sequences`: the global index of every row, which seeds its draws (needed when
        samples > 0)."""
        self._store = {}
        device = self.model.get_output_embeddings().weight.device
        if attention_mask is not None:
            attention_mask = _to_device(attention_mask, device)
        out = self.model.get_decoder()(input_ids=_to_device(input_ids, device), attention_mask=attention_mask,
                                       use_cache=False)
        normed = out.last_hidden_state  # [B, T, d] after the final norm
        B, T, _ = normed.shape
        dev = self._head_outputs(normed.reshape(B * T, -1), sequences, B, T, device)
        if self.codec is None:
            dev.update({("hidden", i): self._store[i].float() for i in self.layers})
        else:
            for i in self.layers:
                h = self._store[i].float()
                for suffix, arr in self.codecs[i].encode_torch(h).items():
                    dev[("encoded", i, suffix)] = arr
                # fp32 on the device (no float64 there); each token's sum over d features is off the writer's
                # float64 sum by at most d float32 roundings, relative; the host adds tokens up in float64
                dev[("squares", i)] = h.square().sum(-1)
        self._store = {}
        return self._to_host(dev, device, (B, T))

    def _head_outputs(self, flat: torch.Tensor, sequences, B: int, T: int, device) -> dict:
        """The LM head in token chunks (never more than one [chunk, V] logits tensor alive): top-k ids, the
        stored values, the fp32 top-k and the tail sums (what finish_lse needs), and the draws."""
        N, k, n_temps = B * T, self.topk, len(self.temperatures)
        ids = torch.empty(N, k, dtype=torch.int32, device=device)
        stored = torch.empty(N, k, dtype=LOGIT_DTYPES[self.logit_dtype], device=device)  # rounded once
        top = torch.empty(N, k, dtype=torch.float32, device=device)
        sums = torch.empty(n_temps, N, dtype=torch.float32, device=device)  # tail sums, or the lse without top-k
        sampler = self._sampler(sequences, B, T, device)  # None without draws
        head = self.model.get_output_embeddings()
        step = self._head_chunk(N, torch.device(device))
        if self.head_shard is not None:
            return self._parallel_head_outputs(flat, sampler, step, ids, stored, top, sums)
        buffer = self._buffer(min(step, N) * self.vocab_size, device) if k else None
        for s in range(0, N, step):
            z = self.head_spec.transform(head(flat[s : s + step]).float())  # [c, V]
            e = s + len(z)
            if sampler is not None:
                sampler(z, s)
            if k == 0:
                sums[:, s:e] = stored_lse(z, top[s:e], None, None, self.temperatures)
                continue
            v, i = torch.topk(z, k, dim=-1)
            ids[s:e], stored[s:e], top[s:e] = i, v, v
            sums[:, s:e] = tail_sums(z, v, i, self.temperatures, buffer)
        dev = {"ids": ids, "stored": stored, "top": top, "sums": sums}
        if sampler is not None:
            dev.update(sample_ids=sampler.ids.to(torch.int32), sample_counts=sampler.counts, sample_logits=sampler.logits.to(
                LOGIT_DTYPES[self.logit_dtype]))
        return dev

    def _parallel_head_outputs(self, flat: torch.Tensor, sampler, step: int, ids, stored, top, sums) -> dict:
        """_head_outputs of a tensor-parallel teacher: per chunk, this rank's logits transform(h @ W_r.T) [c, V_r]
        (the transforms are elementwise, so they apply shard by shard), and the top-k, tail sums and draws of
        the whole vocabulary from vocab_parallel.parallel_head over the group, the same on every rank. The
        model's own lm_head is not called: under transformers' plan it gathers [c, V] logits on every rank.
        The chunk is as many tokens as without TP (sized by the whole vocabulary, the same on every rank of a
        group, as its collectives need), so each rank's [chunk, V_r] buffers take ~1/N of the memory."""
        from pipeline.teacher.vocab_parallel import parallel_head

        shard = self.head_shard
        N, k = flat.shape[0], self.topk
        width = shard.weight.shape[0]
        buffer = self._buffer(min(step, N) * width, flat.device) if k else None
        for s in range(0, N, step):
            z = self.head_spec.transform(torch.nn.functional.linear(flat[s : s + step], shard.weight).float())
            e = s + len(z)
            out = parallel_head(shard.comm, shard.split, [z], k, self.temperatures,
                                None if sampler is None else sampler.uniforms[s:e], self.proposal_temperature, buffer)
            if sampler is not None:
                sampler.ids[s:e], sampler.counts[s:e], sampler.logits[s:e] = (
                    out["sample_ids"], out["sample_counts"], out["sample_logits"])
            if k:
                ids[s:e], stored[s:e], top[s:e] = out["ids"], out["top"], out["top"]
            sums[:, s:e] = out["sums"]
        dev = {"ids": ids, "stored": stored, "top": top, "sums": sums}
        if sampler is not None:
            dev.update(sample_ids=sampler.ids.to(torch.int32), sample_counts=sampler.counts, sample_logits=sampler.logits.to(
                LOGIT_DTYPES[self.logit_dtype]))
        return dev

    def _buffer(self, numel: int, device) -> torch.Tensor:
        """The tail sums' [chunk, V] work buffer, kept across batches (a fresh one per batch costs its page
        faults on a CPU)."""
        if self._work is None or self._work.numel() < numel or self._work.device != torch.device(device):
            self._work = torch.empty(numel, dtype=torch.float32, device=device)
        return self._work

    def _to_host(self, dev: dict, device, shape: tuple[int, int]) -> Launched:
        """Copy the device outputs to the host: on a GPU into pinned memory on the side stream (the caller's
        next forward runs meanwhile), elsewhere as they are."""
        if torch.device(device).type != "cuda":
            return Launched(self, {key: t.cpu() for key, t in dev.items()}, None, shape)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device)
        self._copy_stream.wait_stream(torch.cuda.current_stream(device))
        host = {}
        with torch.cuda.stream(self._copy_stream):
            for key, t in dev.items():
                t.record_stream(self._copy_stream)  # not reused by the next forward before the copy is done
                host[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host[key].copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record(self._copy_stream)
        return Launched(self, host, event, shape)

    def _finish(self, host: dict, shape: tuple[int, int]) -> Captured:
        """Host tensors of one batch -> Captured (the lse finished in float64 here)."""
        B, T = shape
        k, n_temps = self.topk, len(self.temperatures)
        if k:
            lse = finish_lse(host["top"], host["stored"].float(), host["sums"], self.temperatures)
        else:
            lse = host["sums"]
        out = Captured(
            topk_ids=host_array(host["ids"].reshape(B, T, k), self.id_dtype) if k else None,
            topk_logits=host_array(host["stored"].reshape(B, T, k)) if k else None,
            lse=lse.reshape(n_temps, B, T).numpy(),
            hidden={i: host_array(host[("hidden", i)]) for i in self.layers} if self.codec is None else {},
        )
        if self.codec is not None:
            out.encoded = {i: {} for i in self.layers}
            for key, t in host.items():
                if key[0] == "encoded":
                    out.encoded[key[1]][key[2]] = host_array(t)
            out.token_squares = {i: host_array(host[("squares", i)], np.dtype(np.float64)) for i in self.layers}
        if self.samples:
            kk = (B, T, self.samples)
            out.sample_ids = host_array(host["sample_ids"].reshape(kk), self.id_dtype)
            out.sample_counts = host_array(host["sample_counts"].reshape(kk), count_dtype(self.samples))
            out.sample_logits = host_array(host["sample_logits"].reshape(kk))
        return out

    def check(self, captured: Captured, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """One line (PipelineError) unless the captured top-k equals the model's own forward on the first
        CHECK_TOKENS tokens of this batch (head.check_capture): the build runs it on its first batch, before
        anything is written.
        A cache of sampled targets only has no top-k to compare; its logits come from the same head code."""
        if captured.topk_ids is None:
            return
        n = CHECK_TOKENS  # a prefix of the first row: a causal model's logits there are the whole row's
        mask = None if attention_mask is None else attention_mask[:1, :n]
        check_capture(self.model, captured.topk_ids[:1, :n], logits_from_numpy(captured.topk_logits[:1, :n],
                      self.logit_dtype), input_ids[:1, :n], mask, self.logit_dtype, rows=1)

    def _sampler(self, sequences: list[int] | None, B: int, T: int, device):
        if not self.samples:
            return None
        from pipeline.teacher.sampling import SampleBuffers, sequence_uniforms

        if sequences is None or len(sequences) != B:
            raise ValueError(f"drawing samples needs the global index of each of the {B} rows, got {sequences!r}")
        uniforms = torch.from_numpy(sequence_uniforms(self.sample_seed, list(sequences), T, self.samples))
        return SampleBuffers(_to_device(uniforms.reshape(B * T, self.samples), device), self.proposal_temperature)
