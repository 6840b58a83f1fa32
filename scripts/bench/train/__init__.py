"""Phase-two benchmarks: the student trained from the cache, timed and measured in child processes.

    online.py      training from the cache vs from the live teacher (--online), and the cache loader
    finetune.py    distillation vs a stock fine-tune of the same student: step time, memory, where a step goes
    objectives.py  the step cost of FDD and of each divergence against kl
    targets.py     logits KD on top-k, exact and sampled targets of one cache
    sharded.py     FSDP2 at 2 processes against one process and DDP: the training state each holds, step time

common.py holds what they share (the command line, the models and cache, the child runner); children.py the
steps each child process runs; phases.py the per-phase breakdown of a step from torch.profiler's labels.
`python -m scripts.bench.train [--objectives | --targets | --vs-finetune]` runs the one its flag names.
"""
