"""One rank of `torchrun --nproc_per_node N` (gloo) for tests/teacher/test_vocab_parallel.py.

Usage: vocab_parallel_worker.py IN OUT_DIR. IN (torch.save) holds full-vocabulary logits z [c, V], uniforms
[c, K], the temperatures and a list of head configurations {k, proposal_temperature}; the rank takes its own
columns of z (VocabSplit.chunked over the group), runs parallel_head over the group for each configuration
and writes the list of results to OUT_DIR/rank<r>.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.teacher.vocab_parallel import Distributed, VocabSplit, parallel_head


def main(inp: str, out: str) -> None:
    dist.init_process_group("gloo")
    try:
        data = torch.load(inp)
        comm = Distributed()
        (rank,) = comm.ranks
        split = VocabSplit.chunked(data["vocab"], comm.world)
        results = []
        for cfg in data["configs"]:
            shard = split.shard(data["z"], rank)  # a fresh copy each time: the tail sums overwrite it
            results.append(parallel_head(comm, split, [shard], cfg["k"], data["temperatures"], data["uniforms"],
                                         cfg["proposal_temperature"]))
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
