"""`distill`: parse arguments, load the config, call a recipe. Nothing else lives here."""

from __future__ import annotations

import functools
import os
import sys

import click

from pipeline.errors import PipelineError

set_option = click.option(
    "--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
    help="Override one config key (YAML value); repeatable, e.g. --set cache.topk=32.",
)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def user_errors(fn):
    """Bad input ends as one line on stderr and exit code 2; bugs keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            _quiet_libraries()
            return fn(*args, **kwargs)
        except PipelineError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Recover pruned LLMs by distillation from an offline teacher cache.

    Phase one (`distill cache build`) runs the teacher once and stores top-k logits, log-sum-exps
    and mapped hidden states; phase two (`distill train`) trains the student from that cache alone.
    """


# ----------------------------------------------------------------------------- cache


@main.group()
def cache() -> None:
    """Build, verify and inspect teacher caches."""


@cache.command("build")
@click.argument("config", type=click.Path(dir_okay=False))
@set_option
@click.option("--overwrite", is_flag=True, help="Delete a non-empty cache built with another config first.")
@user_errors
def cache_build(config: str, overrides: tuple[str, ...], overwrite: bool) -> None:
    """Run the teacher once over the corpus and write the cache described by CONFIG.

    Rerunning the same config resumes an interrupted build (finished shards are kept). Launch
    with `accelerate launch` or `torchrun` to split the shards over several processes.
    """
    from pipeline.config import load_config
    from pipeline.recipes.cache import build_cache

    build_cache(load_config(config, overrides), overwrite=overwrite)


@cache.command("verify")
@click.argument("cache_dir", type=click.Path(file_okay=False))
@user_errors
def cache_verify(cache_dir: str) -> None:
    """Check the manifest and every shard checksum; exit non-zero naming the first bad file."""
    from pipeline.recipes.cache import verify_cache

    verify_cache(cache_dir)


@cache.command("info")
@click.argument("cache_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
def cache_info(cache_dir: str, as_json: bool) -> None:
    """Teacher, layers, k, temperatures, sizes and bytes/token per component of a cache."""
    from pipeline.recipes.cache import cache_info as info

    info(cache_dir, as_json=as_json)


if __name__ == "__main__":
    main()
