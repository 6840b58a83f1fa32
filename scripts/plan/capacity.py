"""How large a student trains, and how large a teacher caches, per GPU class and number of GPUs: formulas, and
their check against the per-process ratios measured on this CPU (docs/scale.md, "Capacity").

Student (phase two, FSDP2 full sharding over N GPUs, training.bf16 with activation checkpointing), bytes per GPU:
- sharded state: 16 (P + P_proj) / N. The parameters stay fp32 (autocast computes in bf16), so each
  parameter has 4 bytes of weight, 4 of gradient and 8 of AdamW moments; the projectors (8 mapped blocks at
  teacher width 4096 by default: 8 d d_t parameters) are sharded with the student.
- gathered units, which do not shrink with N: the root unit (embeddings, final norm, head) stays gathered from
  its forward to its backward for the chunked loss, with its unsharded gradient before the reduce-scatter:
  8 bytes x its parameters; and a decoder block gathered with the next one prefetched: 2 x 8 bytes x a block.
- activations: each block's checkpointed input, the fp32 residual stream, L t d 4 bytes for t tokens per
  micro-batch; one block's recompute in bf16, t (10 d + 4 f) 2 bytes; the mapped blocks' projector outputs and
  teacher targets, fp32, 8 t 2 d_t 4 bytes.
- the chunked vocabulary loss: its [chunk, V] fp32 buffer, sized to 1/64 of the GPU's memory
  (pipeline.losses.chunked.GPU_BUFFER_SHARE).
- a reserve of 3 GiB (CUDA context, NCCL buffers, allocator fragmentation).
With CPU offload (fsdp: full_shard offload) the sharded state moves to host memory and only the other terms
stay on the GPU: the limit is then the host's memory, 16 (P + P_proj) / N per process.

Teacher (phase one, tensor-parallel size N, bf16 inference), bytes per GPU:
- weights: 2 P / N (transformers' plan splits the attention, the MLP, the embedding and the head; the norms,
  which stay whole, are negligible);
- the capture's head chunk: three [chunk, V / N] fp32 buffers, the chunk sized so that three [chunk, V] fill
  1/16 of the GPU's memory (TeacherCapture._head_chunk): 1/(16 N) of the memory;
- a forward's activations for t tokens (cache.batch_size x seq_len), no gradients: the residual stream
  t d 4, one layer's transients t (4 d + 2 f / N) 2, and the cached layers' outputs before they leave the
  GPU, 8 t d 2;
- the same 3 GiB reserve.

Model shapes: Llama-style (grouped-query attention, gated MLP), from the public configs in SHAPES; P counts
every parameter. The "largest" cell names the largest shape that fits; "max B" is the largest P whose state fits
at the widths of an 8B-class model (d 4096, f 14336, V 128,256), as a continuous measure.

    python -m scripts.plan.capacity [--tokens 4096] [--teacher-tokens 32768] [--measured runs/bench/results.jsonl]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from scripts import harness

GiB = 2 ** 30
GPUS = {"24 GB": 24e9, "40 GB": 40e9, "80 GB": 80e9}
COUNTS = (1, 2, 4, 8)
RESERVE = 3 * GiB
LOSS_BUFFER_SHARE = 1 / 64  # pipeline.losses.chunked.GPU_BUFFER_SHARE
HEAD_SHARE = 1 / 16  # TeacherCapture._head_chunk: three [chunk, V] fp32 buffers in 1/16 of the memory
PROJECTORS, TEACHER_WIDTH, CACHED_LAYERS = 8, 4096, 8


@dataclass(frozen=True)
class Shape:
    name: str
    d: int
    layers: int
    ffn: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @property
    def block(self) -> int:
        attention = self.d * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return attention + 3 * self.d * self.ffn + 2 * self.d

    @property
    def root(self) -> int:
        return self.vocab * self.d * (1 if self.tied else 2) + self.d

    @property
    def params(self) -> int:
        return self.layers * self.block + self.root


SHAPES = [
    Shape("Llama-3.2-1B", 2048, 16, 8192, 128256, 32, 8, 64, True),
    Shape("Llama-3.2-3B", 3072, 28, 8192, 128256, 24, 8, 128, True),
    Shape("Qwen3-4B", 2560, 36, 9728, 151936, 32, 8, 128, True),
    Shape("Minitron-4B (from Llama-3.1-8B)", 3072, 32, 9216, 128256, 32, 8, 128, False),
    Shape("Qwen3-8B pruned to 26 blocks (6B)", 4096, 26, 12288, 151936, 32, 8, 128, False),
    Shape("Llama-3.1-8B", 4096, 32, 14336, 128256, 32, 8, 128, False),
    Shape("Qwen3-14B", 5120, 40, 17408, 151936, 40, 8, 128, False),
    Shape("Qwen3-32B", 5120, 64, 25600, 151936, 64, 8, 128, False),
    Shape("Llama-3.1-70B", 8192, 80, 28672, 128256, 64, 8, 128, False),
    Shape("Llama-3.1-405B", 16384, 126, 53248, 128256, 128, 8, 128, False),
]
WIDTHS_8B = SHAPES[5]


def student_bytes(s: Shape, gpus: int, memory: float, tokens: int, offload: bool = False) -> float:
    state = 16 * (s.params + PROJECTORS * s.d * TEACHER_WIDTH) / gpus
    gathered = 8 * s.root + 2 * 8 * s.block
    activations = s.layers * tokens * s.d * 4 + tokens * (10 * s.d + 4 * s.ffn) * 2 + \
        PROJECTORS * tokens * 2 * TEACHER_WIDTH * 4
    return (0 if offload else state) + gathered + activations + LOSS_BUFFER_SHARE * memory + RESERVE


def teacher_bytes(s: Shape, tp: int, memory: float, tokens: int) -> float:
    activations = tokens * s.d * 4 + tokens * (4 * s.d + 2 * s.ffn / tp) * 2 + CACHED_LAYERS * tokens * s.d * 2
    return 2 * s.params / tp + HEAD_SHARE * memory / tp + activations + RESERVE


def largest(fits) -> str:
    names = [s.name for s in SHAPES if fits(s)]
    return names[-1] if names else "none"


def max_student_billions(gpus: int, memory: float, tokens: int) -> float:
    """The P (billions) whose sharded state fills what the other terms leave, at 8B-class widths."""
    fixed = student_bytes(WIDTHS_8B, gpus, memory, tokens) - 16 * (
        WIDTHS_8B.params + PROJECTORS * WIDTHS_8B.d * TEACHER_WIDTH) / gpus
    return max(0.0, (memory - fixed) * gpus / 16 / 1e9)


def tables(tokens: int, teacher_tokens: int) -> None:
    print(f"Student, FSDP2 full sharding, bf16 autocast + activation checkpointing, {tokens} tokens per GPU")
    print(harness.table_header("GPU", *[f"{n} GPU{'s' if n > 1 else ''}" for n in COUNTS]))
    for gpu, memory in GPUS.items():
        cells = [f"{largest(lambda s: student_bytes(s, n, memory, tokens) <= memory)} "
                 f"(max {max_student_billions(n, memory, tokens):.1f}B)" for n in COUNTS]
        print(harness.table_row(gpu, *cells))
    print(f"\nTeacher, tensor-parallel, bf16, {teacher_tokens} tokens per forward")
    print(harness.table_header("GPU", *[f"TP {n}" for n in COUNTS]))
    for gpu, memory in GPUS.items():
        print(harness.table_row(gpu, *[largest(lambda s: teacher_bytes(s, n, memory, teacher_tokens) <= memory)
                                       for n in COUNTS]))
    print("\nPer-GPU need of each reference shape (GiB), student at 1 / 8 GPUs, teacher at TP 1 / 8 (80 GB):")
    print(harness.table_header("shape", ">params B", ">student 1", ">student 8", ">teacher TP 1", ">teacher TP 8"))
    for s in SHAPES:
        print(harness.table_row(s.name, f"{s.params / 1e9:.2f}",
                                *[f"{student_bytes(s, n, 80e9, tokens) / GiB:.0f}" for n in (1, 8)],
                                *[f"{teacher_bytes(s, n, 80e9, teacher_tokens) / GiB:.0f}" for n in (1, 8)]))


def check(measured: Path | None) -> None:
    """The formulas' per-process ratio at N = 2 against the measured ones, at the measured shapes."""
    rows = []
    if measured is not None and measured.is_file():
        rows = [json.loads(line) for line in measured.read_text().splitlines() if line.strip()]
    print("\nFormula against measurement, 2 processes / 1 (this CPU):")
    print(harness.table_header("quantity", ">formula", ">measured"))
    student = [r for r in rows if r.get("bench") == "sharded_student" and r.get("run", "").startswith("FSDP2")]
    teacher = [r for r in rows if r.get("bench") == "tp_teacher"]
    # sharded state: 16 (P + P_proj) / 2 of 16 (P + P_proj); FSDP pads each parameter's rows to a multiple of N,
    # a few rows at most
    print(harness.table_row("student: parameters + gradients + AdamW per process", "0.500",
                            f"{student[-1]['held_total_ratio']:.3f}" if student else "not measured"))
    # weights: everything but the norms (2 d per block + d) splits in two
    print(harness.table_row("teacher: weights per process", "0.500 (+ the norms, whole)",
                            f"{teacher[-1]['weights_ratio']:.3f}" if teacher else "not measured"))
    print(harness.table_row("teacher: head chunk per process", "0.500",
                            f"{teacher[-1]['head_chunk_ratio']:.3f}" if teacher else "not measured"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="student tokens per GPU and micro-batch")
    ap.add_argument("--teacher-tokens", type=int, default=32768, help="teacher tokens per forward")
    ap.add_argument("--measured", type=Path, default=Path("runs/bench/results.jsonl"),
                    help="JSON lines of scripts.bench.train.sharded and scripts.bench.tp_teacher")
    args = ap.parse_args(argv)
    tables(args.tokens, args.teacher_tokens)
    check(args.measured)


if __name__ == "__main__":
    main()
