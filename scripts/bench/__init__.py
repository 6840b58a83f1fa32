"""The performance benchmarks. `make bench` runs these in turn, each appending its rows to one JSON-lines
file, then summary.py prints one table of them all:

    cache.py      phase one on this CPU: the whole build against the teacher's forward; bytes per codec
    writer.py     the cache writer alone, per core, against its raw codecs
    train/        phase two (online.py, the one `make bench` runs: cache vs live teacher; finetune.py,
                  objectives.py, targets.py)
    head_loss.py  the vocabulary losses alone against the stock head + CE
    eval.py       benchmark items/s per task
    ablate.py     one cache for N variants against N separate runs
    reader_checks.py  the training loader's tokens/s with the cache's checksums checked on read, against none
    train/sharded.py  phase two sharded (FSDP2, 2 processes): per-process training state and step time
                  against one process and DDP
    tp_teacher.py phase one with a tensor-parallel teacher (TP = 2): per-process weights and head chunk

gpu.py is phase one on a GPU (tiny on a CPU). The format studies (what a layout stores, how faithfully) are
under scripts/studies/; `make bench` also runs studies/side_data.py, and scripts/plan/capacity.py, whose
formulas it checks against the two sharded benchmarks' rows.
"""
