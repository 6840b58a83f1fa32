"""How large a student trains, and how large a teacher caches, per GPU class (24, 40, 80 GB) and number of GPUs
(1, 2, 4, 8): formulas, and their check against the per-process ratios measured on a CPU (docs/scale.md,
"Capacity: sharded student and tensor-parallel teacher").

Everything in the tables is computed from the formulas below; none of it was measured on a GPU (none was
available). The check at the end puts the formulas' per-process ratio at N = 2 beside the ratio measured on a
CPU, at the measured shapes (rows of scripts.bench.tp_teacher and scripts.bench.train.sharded).

Student, phase two: FSDP2 full sharding over N GPUs (pipeline/train/fsdp.py), training.bf16 (the Trainer's
autocast: parameters stay fp32) and training.activation_checkpointing. Bytes per GPU, t tokens per micro-batch:

- sharded state, 16 (P + P_proj) / N: an fp32 parameter, its fp32 gradient and AdamW's two fp32 moments, for the
  student and the projectors (n_proj linear maps d -> d_t; 8 at d = d_t = 4096 are 134M parameters).
- the root unit, which does not shrink with N: the embeddings, final norm and head stay gathered from the
  forward to the backward (fully_shard of the root with reshard_after_forward False, so that the chunked loss
  reads the gathered head), 4 bytes x P_root; and two [V, d] fp32 gradients before the root's reduce-scatter:
  the chunked loss's head gradient (accumulated in its forward, held until its backward) and the embedding's
  dense gradient, 8 V d.
- the blocks gathered, which do not shrink with N: the block being run and the next one prefetched, each with
  its fp32 parameters and, in the backward, its unsharded fp32 gradient: 2 x 8 x P_block; one projector the same
  way, 8 d d_t.
- activations (estimates): every block's checkpointed input, the residual stream, fp32 under autocast,
  L t d 4; one block recomputed with its backward, 2 x t (32 d + 8 f) (bf16 matmul inputs and outputs, fp32
  norms); the mapped blocks' projector outputs and their teacher targets, fp32, n_proj t d_t 8; the final
  hidden states and their gradient, t d 8.
- the chunked vocabulary loss's chunk: its rows fill 1/64 of the GPU's memory with one [chunk, V] fp32 buffer
  (pipeline.losses.chunked.GPU_BUFFER_SHARE); 2.5 such buffers are assumed alive (the logits, the second
  buffer for exp at T != 1, the bf16 cast of the logits' gradient).
- a reserve: 1.5 GiB (CUDA context, NCCL buffers) + 5% of the memory (allocator fragmentation).
With CPU offload (fsdp: full_shard offload) the sharded state lives in host memory: 16 (P + P_proj) / N per
process there, and only the other terms on the GPU.

Teacher, phase one: teacher.tensor_parallel N (transformers' TP plan splits the attention, the MLP, the
embedding and the head; the norms stay whole), bf16 inference, t tokens per forward (cache.batch_size x
seq_len). Bytes per GPU:

- weights: 2 bytes x (the split parameters / N + the norms);
- the capture's head chunk (TeacherCapture._head_chunk: as many tokens c as make three [c, V] fp32 buffers a
  sixteenth of the memory, the same c at every N): each rank's logits [c, V / N] cost 8 bytes each (the fp32
  logits and the tail sums' work buffer) plus the larger of the head's bf16 output before its fp32 copy (2)
  and, at N > 1, the top-k mask of vocab_parallel.local_tail_sums (1);
- the forward's activations (estimates, no gradients): the residual stream and the final-normed states,
  bf16, t d 4; one layer's transients, t (2 (3 d + (2 d + 2 d_kv + 3 f) / N) + 4 d) (the split projections'
  outputs / N, the row-parallel partial sums whole, an fp32 norm temporary);
- the captured block outputs on the writing rank: L_c layers kept in bf16 until encoded, their encodings for
  two batches in flight (the bf16 codec: 2 bytes), one fp32 copy being encoded: t d (L_c (2 + 2 x 2) + 4);
- the same reserve.

Model shapes: the reference shapes in SHAPES are the public configs (grouped-query attention, gated MLP); P
counts every parameter of a Llama of that shape (Qwen3's per-head q/k norms, 2 x 128 per block, are left out:
under 10^-6 of P). The "largest" cell names the largest reference shape that fits. "max" is the
largest P that fits along a one-parameter Llama-3 family: width d, L = d / 128 blocks, MLP 3.5 d, heads of 128
(8 KV heads), vocabulary 128,256, untied (d = 4096 gives Llama-3.1-8B's 8.03B exactly; d = 2048 a 1.5B).

    python -m scripts.plan.capacity [--tokens 4096] [--teacher-tokens 16384] [--measured FILE.jsonl ...]
"""

from __future__ import annotations

import argparse
import glob
import math
from dataclasses import dataclass
from pathlib import Path

from scripts import harness

GiB = 2 ** 30
GPUS = {"24 GB": 24 * GiB, "40 GB": 40 * GiB, "80 GB": 80 * GiB}  # nominal; the reserve covers the difference
COUNTS = (1, 2, 4, 8)
LOSS_SHARE = 1 / 64  # pipeline.losses.chunked.GPU_BUFFER_SHARE: one [chunk, V] fp32 buffer's share of the memory
LOSS_BUFFERS = 2.5  # such buffers alive at once (assumed)
HEAD_SHARE, HEAD_BUFFERS = 1 / 16, 3  # TeacherCapture._head_chunk: three [c, V] fp32 buffers in 1/16 of memory
MEASURED = "runs/bench/*.jsonl"


@dataclass(frozen=True)
class Plan:
    """The inputs the formulas take besides the shape and the GPU (the command line sets them)."""

    tokens: int = 4096  # student tokens per GPU and micro-batch (e.g. 2 x 2048)
    teacher_tokens: int = 16384  # teacher tokens per forward (cache.batch_size 8 x 2048)
    projectors: int = 8
    teacher_width: int = 4096
    cached_layers: int = 8
    reserve_fixed: float = 1.5 * GiB
    reserve_share: float = 0.05

    def reserve(self, memory: float) -> float:
        return self.reserve_fixed + self.reserve_share * memory


@dataclass(frozen=True)
class Shape:
    name: str
    d: float
    layers: float
    ffn: float
    vocab: int
    heads: float
    kv_heads: int
    head_dim: int
    tied: bool

    @property
    def kv_dim(self) -> float:
        return self.kv_heads * self.head_dim

    def matrices(self) -> list[tuple[float, float, float]]:
        """(rows, columns, count) of every weight matrix: q, k, v, o, gate, up, down per block, embedding, head."""
        q = self.heads * self.head_dim
        block = [(q, self.d), (self.kv_dim, self.d), (self.kv_dim, self.d), (self.d, q),
                 (self.ffn, self.d), (self.ffn, self.d), (self.d, self.ffn)]
        root = [(self.vocab, self.d)] * (1 if self.tied else 2)
        return [(r, c, self.layers) for r, c in block] + [(r, c, 1) for r, c in root]

    @property
    def norms(self) -> float:
        return self.layers * 2 * self.d + self.d

    @property
    def block(self) -> float:
        return sum(r * c for r, c, n in self.matrices() if n == self.layers) + 2 * self.d

    @property
    def root(self) -> float:
        return self.vocab * self.d * (1 if self.tied else 2) + self.d

    @property
    def params(self) -> float:
        return sum(r * c * n for r, c, n in self.matrices()) + self.norms


SHAPES = sorted([
    Shape("Llama-3.2-1B", 2048, 16, 8192, 128256, 32, 8, 64, True),
    Shape("Llama-3.2-3B", 3072, 28, 8192, 128256, 24, 8, 128, True),
    Shape("Qwen3-4B", 2560, 36, 9728, 151936, 32, 8, 128, True),
    Shape("Llama-3.1-Minitron-4B-Width", 3072, 32, 9216, 128256, 32, 8, 128, False),
    Shape("Qwen3-8B pruned to 26 blocks", 4096, 26, 12288, 151936, 32, 8, 128, False),
    Shape("Llama-3.1-8B", 4096, 32, 14336, 128256, 32, 8, 128, False),
    Shape("Qwen3-14B", 5120, 40, 17408, 151936, 40, 8, 128, False),
    Shape("Qwen3-32B", 5120, 64, 25600, 151936, 64, 8, 128, False),
    Shape("Llama-3.1-70B", 8192, 80, 28672, 128256, 64, 8, 128, False),
    Shape("Llama-3.1-405B", 16384, 126, 53248, 128256, 128, 8, 128, False),
], key=lambda s: s.params)


def family(d: float) -> Shape:
    """The Llama-3 family at width d (continuous): L = d / 128, MLP 3.5 d, heads of 128, 8 KV heads, V 128,256."""
    return Shape(f"Llama-3 family d={d:.0f}", d, d / 128, 3.5 * d, 128256, d / 128, 8, 128, False)


# ----------------------------------------------------------------------------- the formulas


def student_terms(s: Shape, gpus: int, memory: float, plan: Plan) -> dict[str, float]:
    """Bytes per GPU of an FSDP2 student (module docstring), term by term."""
    t, proj = plan.tokens, plan.projectors * s.d * plan.teacher_width
    return {
        "sharded state": 16 * (s.params + proj) / gpus,
        "root, gathered": 4 * s.root + 8 * s.vocab * s.d,
        "blocks, gathered": 2 * 8 * s.block + 8 * s.d * plan.teacher_width,
        "activations": t * (s.layers * s.d * 4 + 2 * (32 * s.d + 8 * s.ffn)
                            + plan.projectors * plan.teacher_width * 8 + s.d * 8),
        "loss chunk": LOSS_BUFFERS * LOSS_SHARE * memory,
        "reserve": plan.reserve(memory),
    }


def head_chunk_tokens(s: Shape, memory: float, tokens: int) -> int:
    """TeacherCapture._head_chunk on a GPU of `memory` bytes."""
    return max(1, min(tokens, int(memory * HEAD_SHARE) // (HEAD_BUFFERS * 4 * s.vocab)))


def head_bytes_per_logit(weight_bytes: int, tp: int) -> int:
    """Bytes per logit of a rank's head chunk at its largest: fp32 logits + the work buffer, plus the larger of
    the head output before its fp32 copy (none for an fp32 teacher) and the top-k mask (TP > 1)."""
    return 8 + max(weight_bytes if weight_bytes != 4 else 0, 1 if tp > 1 else 0)


def tp_local_params(s: Shape, tp: int) -> float:
    """A rank's parameters at TP = tp: every matrix split (the vocabulary by ceil(V / tp) rows), the norms whole."""
    split = sum((math.ceil(r / tp) * c if r == s.vocab else r * c / tp) * n for r, c, n in s.matrices())
    return split + s.norms


def teacher_terms(s: Shape, tp: int, memory: float, plan: Plan) -> dict[str, float]:
    """Bytes per GPU of a tensor-parallel bf16 teacher (module docstring), term by term."""
    t, chunk = plan.teacher_tokens, head_chunk_tokens(s, memory, plan.teacher_tokens)
    return {
        "weights": 2 * tp_local_params(s, tp),
        "head chunk": chunk * math.ceil(s.vocab / tp) * head_bytes_per_logit(2, tp),
        "forward": t * (4 * s.d + 2 * (3 * s.d + (2 * s.d + 2 * s.kv_dim + 3 * s.ffn) / tp) + 4 * s.d),
        "captured layers": t * s.d * (plan.cached_layers * (2 + 2 * 2) + 4),
        "reserve": plan.reserve(memory),
    }


def fits(terms: dict[str, float], memory: float) -> bool:
    return sum(terms.values()) <= memory


def largest_shape(fit) -> str:
    names = [s.name for s in SHAPES if fit(s)]
    return names[-1] if names else "none"


def max_billions(fit) -> float:
    """The largest P (billions) along the Llama-3 family that `fit` accepts (bisection on the width)."""
    lo, hi = 0.0, 65536.0
    if not fit(family(256)):
        return 0.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fit(family(mid)) else (lo, mid)
    return family(lo).params / 1e9


# ----------------------------------------------------------------------------- the tables


def capacity_table(title: str, label: str, terms, plan: Plan) -> None:
    print(f"\n{title}")
    print(harness.table_header("GPU", *[f"{label} {n}" for n in COUNTS]))
    for gpu, memory in GPUS.items():
        cells = []
        for n in COUNTS:
            fit = lambda s, n=n: fits(terms(s, n, memory, plan), memory)
            cells.append(f"{largest_shape(fit)} (max {max_billions(fit):.1f}B)")
        print(harness.table_row(gpu, *cells))


def need_table(title: str, label: str, terms, plan: Plan, memory: float = GPUS["80 GB"]) -> None:
    print(f"\n{title}")
    print(harness.table_header("shape", ">params B", *[f">{label} {n}" for n in COUNTS]))
    for s in SHAPES:
        print(harness.table_row(s.name, f"{s.params / 1e9:.2f}",
                                *[f"{sum(terms(s, n, memory, plan).values()) / GiB:.1f}" for n in COUNTS]))


def terms_table(title: str, terms, cases, plan: Plan) -> None:
    print(f"\n{title}")
    names = list(terms(SHAPES[0], 1, GPUS["80 GB"], plan))
    print(harness.table_header("case", *[f">{k}" for k in names], ">total"))
    for s, n, gpu in cases:
        got = terms(s, n, GPUS[gpu], plan)
        print(harness.table_row(f"{s.name}, {n} x {gpu}", *[f"{v / GiB:.1f}" for v in got.values()],
                                f"{sum(got.values()) / GiB:.1f}"))


def tables(plan: Plan) -> None:
    capacity_table(f"Student, FSDP2 full sharding, bf16 autocast + activation checkpointing, {plan.tokens} tokens "
                   f"per GPU, {plan.projectors} projectors to width {plan.teacher_width}", "GPUs:",
                   student_terms, plan)
    capacity_table(f"Teacher, tensor-parallel, bf16, {plan.teacher_tokens} tokens per forward, {plan.cached_layers} "
                   "cached layers", "TP", teacher_terms, plan)
    need_table("Student: GiB per 80 GB GPU at N GPUs", "N =", student_terms, plan)
    need_table("Teacher: GiB per 80 GB GPU at TP N", "TP", teacher_terms, plan)
    by_name = {s.name: s for s in SHAPES}
    terms_table("Student terms (GiB per GPU)", student_terms,
                [(by_name["Llama-3.1-8B"], n, "80 GB") for n in COUNTS]
                + [(by_name["Qwen3-8B pruned to 26 blocks"], 8, "40 GB")], plan)
    terms_table("Teacher terms (GiB per GPU)", teacher_terms,
                [(by_name["Llama-3.1-70B"], n, "80 GB") for n in (2, 4, 8)]
                + [(by_name["Llama-3.1-8B"], n, "24 GB") for n in (1, 2)], plan)


# ----------------------------------------------------------------------------- the check


def measured_rows(paths: list[str]) -> list[dict]:
    return [row for path in paths for row in harness.read_rows(Path(path))]


def teacher_shape(row: dict) -> Shape:
    """The Shape of a tp_teacher row's teacher (its recorded config keys)."""
    c = row["shape"]
    return Shape("bench teacher", c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"],
                 c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["tie_word_embeddings"])


def teacher_check(row: dict) -> list[tuple]:
    """(quantity, formula TP1, measured TP1, formula TP2, measured TP2) in bytes, at the row's fp32 shape."""
    s = teacher_shape(row)
    chunk = row["tp1"][0]["logits_shape"][0]
    largest = lambda key, ranks: max(m[key] for m in ranks)
    weights = [4 * tp_local_params(s, n) for n in (1, 2)]
    block = [chunk * math.ceil(s.vocab / n) * 4 for n in (1, 2)]
    working = [chunk * math.ceil(s.vocab / n) * head_bytes_per_logit(4, n) for n in (1, 2)]
    measured = {key: [largest(key, row["tp1"]), largest(key, row["tp2"])]
                for key in ("weights", "logits_block", "head_peak")}
    return [("teacher weights (a)", weights, measured["weights"]),
            ("teacher logits block (b)", block, measured["logits_block"]),
            ("teacher weights + logits block (a + b)", [w + b for w, b in zip(weights, block)],
             [w + b for w, b in zip(measured["weights"], measured["logits_block"])]),
            ("teacher head working set", working, measured["head_peak"]),
            ("teacher weights + head working set", [w + b for w, b in zip(weights, working)],
             [w + b for w, b in zip(measured["weights"], measured["head_peak"])])]


def student_check(rows: list[dict]) -> list[tuple]:
    """The FSDP2 row's held training state (parameters, gradients, AdamW: 16 bytes an element) against one
    process's, at the benchmark's student and projectors (FSDP2 pads each parameter's rows to a multiple of N)."""
    fsdp = [r for r in rows if r.get("mode") == "fsdp2"]  # 2 processes (not a --world-one row)
    if not fsdp:
        return []
    one = [r for r in rows if r.get("run") == "one process" and r.get("parameters") == fsdp[-1].get("parameters")]
    elements = bench_student_elements(fsdp[-1].get("parameters"), 2)
    formula = [16 * elements[1], 16 * elements[0]] if elements else [None, None]  # one process, one of two
    held = [one[-1]["held_bytes"]["total"] if one else None, fsdp[-1]["held_bytes"]["total"]]
    return [("student parameters + gradients + AdamW", formula, held, fsdp[-1]["held_total_ratio"])]


SMOLLM2_VOCAB = 49152  # scripts.bench.train.sharded's students take the packaged SmolLM2 config's vocabulary


def bench_student_elements(parameters, n: int) -> tuple[float, float] | None:
    """(elements one of n processes holds, elements in all) of scripts.bench.train.sharded's student (matched by
    its parameter count) and its 2 linear projectors to the teacher's width; None for another student."""
    from scripts.bench.train import sharded

    for config in (sharded.STUDENT, sharded.SMOKE_STUDENT):
        s = Shape("bench student", config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"],
                  SMOLLM2_VOCAB, config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"],
                  config["tie_word_embeddings"])
        if parameters is not None and round(s.params) == parameters:
            mats = s.matrices() + [(sharded.TEACHER["hidden_size"], s.d, 2)]
            norms = 2 * s.layers + 1
            local = sum(math.ceil(r / n) * c * k for r, c, k in mats) + math.ceil(s.d / n) * norms
            return local, sum(r * c * k for r, c, k in mats) + s.d * norms
    return None


def check(paths: list[str]) -> None:
    """The formulas' per-process numbers and ratio TP2 / TP1 (or FSDP2 at 2 / one process) beside the measured."""
    rows = measured_rows(paths)
    teacher = [r for r in rows if r.get("bench") == "tp_teacher" and "shape" in r]
    student = [r for r in rows if r.get("bench") == "sharded_student"]
    print(f"\nFormula against measurement, 2 processes against 1, at the measured shapes (CPU, fp32); read from "
          f"{', '.join(paths) or 'no file'}")
    print(harness.table_header("quantity", ">formula 1 MiB", ">measured 1 MiB", ">formula 2 MiB", ">measured 2 MiB",
                               ">formula ratio", ">measured ratio"))
    mib = lambda v: "" if v is None else f"{v / 2 ** 20:.1f}"
    for name, formula, measured in teacher_check(teacher[-1]) if teacher else []:
        print(harness.table_row(name, mib(formula[0]), mib(measured[0]), mib(formula[1]), mib(measured[1]),
                                f"{formula[1] / formula[0]:.4f}", f"{measured[1] / measured[0]:.4f}"))
    if not teacher:
        print(harness.table_row("teacher weights + logits block", "", "", "", "", "0.5000", "not measured"))
    for name, formula, measured, ratio in student_check(student):
        expected = f"{formula[1] / formula[0]:.4f}" if formula[0] else "0.5000"
        print(harness.table_row(name, mib(formula[0]), mib(measured[0]), mib(formula[1]), mib(measured[1]),
                                expected, f"{ratio:.4f}"))
    if not student_check(student):
        print(harness.table_row("student parameters + gradients + AdamW", "", "", "", "", "0.5000", "not measured"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=Plan.tokens, help="student tokens per GPU and micro-batch (4096)")
    ap.add_argument("--teacher-tokens", type=int, default=Plan.teacher_tokens,
                    help="teacher tokens per forward, cache.batch_size x seq_len (16384)")
    ap.add_argument("--cached-layers", type=int, default=Plan.cached_layers, help="teacher layers cached (8)")
    ap.add_argument("--projectors", type=int, default=Plan.projectors, help="student projectors (8)")
    ap.add_argument("--teacher-width", type=int, default=Plan.teacher_width, help="projectors' output width (4096)")
    ap.add_argument("--measured", nargs="*", default=None,
                    help=f"JSON-lines files of scripts.bench.tp_teacher and scripts.bench.train.sharded rows (default: "
                         f"every {MEASURED}); a quantity with no row prints 'not measured'")
    args = ap.parse_args(argv)
    plan = Plan(tokens=args.tokens, teacher_tokens=args.teacher_tokens, cached_layers=args.cached_layers,
                projectors=args.projectors, teacher_width=args.teacher_width)
    tables(plan)
    check(sorted(glob.glob(MEASURED)) if args.measured is None else args.measured)


if __name__ == "__main__":
    main()
