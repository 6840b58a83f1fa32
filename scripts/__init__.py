"""The benchmark suite and the tools around it. Run each from the repository root as a module:

    python -m scripts.bench.<name>      performance benchmarks (`make bench` runs the suite: scripts/bench/__init__.py)
    python -m scripts.studies.<name>    format studies: what a cache layout stores and how faithfully
    python -m scripts.docs.results      the tables of docs/results.md and docs/results-toy.md from the runs
    python -m scripts.plan.scale        the measured inputs and the capacity plan of docs/scale.md

harness.py is what they share (random models, child runs, result rows and tables); replay.py replays a
teacher's captured rows through the cache writer (the writer benchmark and the capacity plan).
"""
