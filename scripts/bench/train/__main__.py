"""`python -m scripts.bench.train [--objectives | --targets | --vs-finetune] ...`: the run its flag names
(none: cache vs online), as `python -m scripts.bench.train.<online|objectives|targets|finetune>` runs it."""

from scripts.bench.train import common

common.main()
