"""`distill demo`: the chain on the embedded real model, offline.

For now: build the demo cache from the packaged SmolLM2 teacher and Wikipedia corpus
(configs/demo.yaml), verify it, and print `cache info`.
"""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.config import load_config
from pipeline.recipes.cache import build_cache, cache_info, verify_cache

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def run_demo(config: str | Path = DEMO_CONFIG, overrides: tuple[str, ...] = ()) -> None:
    cfg = load_config(config, overrides)
    click.echo(f"[1/3] cache build: teacher {cfg.teacher.model}, {cfg.data.num_sequences} x {cfg.data.seq_len} tokens "
               f"-> {cfg.cache.dir}", err=True)
    build_cache(cfg)
    click.echo("[2/3] cache verify", err=True)
    verify_cache(cfg.cache.dir)
    click.echo("[3/3] cache info", err=True)
    cache_info(cfg.cache.dir)
