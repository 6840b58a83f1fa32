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
    """Check the manifest and every shard checksum; exit non-zero naming the first bad file.

    CACHE_DIR is a folder or an fsspec URL (s3://bucket/prefix, ...); options such as an endpoint
    come from fsspec's config (e.g. FSSPEC_S3_ENDPOINT_URL) or the backend's environment."""
    from pipeline.recipes.cache import verify_cache

    verify_cache(cache_dir)


@cache.command("info")
@click.argument("cache_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
def cache_info(cache_dir: str, as_json: bool) -> None:
    """Teacher, layers, k, temperatures, sizes and bytes/token per component of a cache (a folder or an
    fsspec URL, as for `cache verify`)."""
    from pipeline.recipes.cache import cache_info as info

    info(cache_dir, as_json=as_json)


# ----------------------------------------------------------------------------- prune


@main.command("prune")
@click.option("--model", "model", required=True, metavar="SRC",
              help="Model to prune: packaged name, hub id, HF folder or .gguf file.")
@click.option("--out", "out", required=True, type=click.Path(), metavar="DIR", help="Output HF folder.")
@click.option("--method", default=None,
              help="Depth pruning method (a registered name; default importance; an unknown name lists the valid ones).")
@click.option("--remove", default=None, metavar="N|FRACTION", help="Blocks to remove: a count (6) or a fraction (0.2).")
@click.option("--keep-first", default=0, show_default=True, type=int, help="Protect the first K blocks from removal.")
@click.option("--keep-last", default=0, show_default=True, type=int, help="Protect the last K blocks from removal.")
@click.option("--hidden-size", type=int, default=None, help="New hidden size (hidden channels by importance).")
@click.option("--intermediate-size", type=int, default=None, help="New MLP width (neurons by importance).")
@click.option("--num-heads", type=int, default=None,
              help="New number of query heads (a multiple of the key/value heads; pruned within each group).")
@click.option("--width-importance", default="activation", show_default=True,
              help="Width importance kind (a registered name; an unknown name lists the valid ones).")
@click.option("--calibration", default="wiki-vital", show_default=True, metavar="SOURCE",
              help="Calibration corpus: packaged name, hub dataset id, .jsonl/.json/.parquet/.txt file.")
@click.option("--text-field", default="text", show_default=True, help="Text field of the calibration records.")
@click.option("--calibration-sequences", default=64, show_default=True, type=int,
              help="Sequences used to measure importance.")
@click.option("--heldout-sequences", default=16, show_default=True, type=int,
              help="Held-out sequences for perplexity / KL scoring (0: skip scoring).")
@click.option("--seq-len", default=256, show_default=True, type=int, help="Tokens per calibration sequence.")
@click.option("--batch-size", default=4, show_default=True, type=int)
@click.option("--candidates", multiple=True, metavar="METHOD:N,...",
              help="Build and score several depth variants, keep the best, e.g. importance:6,last:6,consecutive:6.")
@click.option("--select-by", default="kl", show_default=True,
              help="Held-out score that picks the best candidate (lower wins; kl = KL to the unpruned model).")
@click.option("--dtype", default="float32", show_default=True, help="Load (and save) dtype.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@user_errors
def prune(**kwargs) -> None:
    """Make a student: remove blocks (depth) and/or shrink hidden size, MLP width, heads (width).

    Writes an HF folder with pruning.json (kept_layers, scores, kept channels/neurons/heads) and,
    with --candidates, candidates.json (the scored table).
    """
    from pipeline.recipes.prune import run_prune

    model, out = kwargs.pop("model"), kwargs.pop("out")
    run_prune(model, out, echo=click.echo, **kwargs)


# ----------------------------------------------------------------------------- train


@main.command("train")
@click.argument("config", type=click.Path(dir_okay=False))
@set_option
@click.option("--online", is_flag=True,
              help="Compute the same losses from the live teacher instead of the cache (parity checks).")
@click.option("--resume", default=None, is_flag=False, flag_value="latest", metavar="[CHECKPOINT]",
              help="Resume from the latest checkpoint in training.output_dir, or from CHECKPOINT.")
@user_errors
def train(config: str, overrides: tuple[str, ...], online: bool, resume: str | None) -> None:
    """Train the student and its projectors from the cache named in CONFIG (no teacher weights loaded).

    Writes training.output_dir: student/ (plain HF folder), projectors.safetensors + projectors.json,
    trainer_state.json, run.json and checkpoint-N/ folders.

    \b
    Several processes (DDP; gloo on CPU, with training.use_cpu=true):
      accelerate launch --multi_gpu --num_processes 2 -m pipeline.cli train CONFIG
      torchrun --nproc_per_node 2 -m pipeline.cli train CONFIG
    On a CPU-only machine `accelerate launch --cpu` starts ONE process (it needs mpirun for more).

    \b
    Sharded (FSDP2: the student, projectors and optimizer state split across processes):
      torchrun --nproc_per_node 2 -m pipeline.cli train CONFIG --set training.fsdp=full_shard
      accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 -m pipeline.cli train CONFIG
    add `offload` (training.fsdp="full_shard offload") to keep the shards in host memory (also at
    --nproc_per_node 1: one GPU, a student larger than its memory), and
    training.activation_checkpointing=true to recompute each block in the backward.
    """
    from pipeline.config import load_config
    from pipeline.recipes.train import run_train

    run_train(load_config(config, overrides), online=online, resume=resume)


# ----------------------------------------------------------------------------- eval, report, ablate


@main.command("eval")
@click.option("--model", "model", required=True, metavar="SRC",
              help="Model to evaluate: packaged name, hub id, HF folder or .gguf file.")
@click.option("--reference", default=None, metavar="SRC",
              help="Live reference (the teacher) for KL on --text; --heldout takes the teacher from the cache.")
@click.option("--tasks", default=None, metavar="LIST",
              help="Comma-separated lm-eval stock tasks (default: arc_easy,arc_challenge,hellaswag,winogrande,"
                   "lambada_openai,piqa; 'none' skips the benchmarks; an unknown name lists the valid ones).")
@click.option("--limit", default=None, metavar="N|TASK=N,...",
              help="lm-eval's limit: the first N items of each task (the same items for every model); "
                   "TASK=N[,TASK=N...] limits the tasks named and scores the others whole.")
@click.option("--heldout", default=None, metavar="CACHE_DIR", type=click.Path(file_okay=False),
              help="Held-out perplexity on the cache's held-out split, and KL(teacher || model) at T=1 from the "
                   "cached top-k + lse (top-k plus an exact tail bucket).")
@click.option("--text", default=None, metavar="FILE", type=click.Path(dir_okay=False),
              help="Perplexity on a text file (.txt documents separated by blank lines, or .jsonl/.json/.parquet "
                   "with a text field); KL needs --reference.")
@click.option("--seq-len", default=256, show_default=True, type=int, help="Tokens per row for --text.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--dtype", default="float32", show_default=True, help="Load dtype: float32, bfloat16 or float16.")
@click.option("--revision", default=None, help="Hub revision of --model (hub ids only).")
@click.option("--out", default=None, metavar="FILE.json", type=click.Path(dir_okay=False),
              help="Write the results JSON (read by distill report / ablate).")
@user_errors
def evaluate(model, reference, tasks, limit, heldout, text, seq_len, batch_size, dtype, revision, out) -> None:
    """Score one model: lm-eval benchmarks (stock tasks, packaged validation splits) and held-out text.

    Prints a markdown table; --out writes the JSON that `distill report` and `distill ablate` read.
    """
    from pipeline.evaluate.benchmarks import parse_limit
    from pipeline.recipes.evaluate import run_eval

    run_eval(model, reference=reference, tasks=tasks, limit=parse_limit(limit), heldout=heldout, text=text,
             batch_size=batch_size, seq_len=seq_len, dtype=dtype, revision=revision, out=out)


@main.command("report")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", default=None, type=click.Path(file_okay=False), metavar="DIR",
              help="Output folder (default: RUN_DIR/report for one run, <parent of the first run>/report for several).")
@click.option("--eval", "eval_files", multiple=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="Eval JSON (teacher.json, pruned.json by file name); repeatable. Default: each RUN_DIR/eval/*.json.")
@user_errors
def report(run_dirs, out, eval_files) -> None:
    """report.md and figures (loss components, per-layer feature loss, held-out cosine heatmap) for one run,
    or one comparison report for several; with eval JSONs of teacher, pruned and recovered models, the
    before/after table and the recovery metrics."""
    from pipeline.recipes.report import run_report

    run_report(list(run_dirs), out, list(eval_files), echo=lambda m: click.echo(m, err=True))


@main.command("ablate")
@click.argument("config", type=click.Path(dir_okay=False))
@set_option
@user_errors
def ablate(config: str, overrides: tuple[str, ...]) -> None:
    """Train every variant in the config's `ablate:` section from ONE teacher cache, evaluate and compare them.

    \b
    Checks every variant before anything runs; builds the cache once if it is missing (the union of the
    teacher layers all variants' maps need); trains and evaluates each variant in its own process into
    ablate.output_dir/<variant>/; scores the teacher and the untrained student once
    (ablate.output_dir/baseline/). A finished variant is skipped on rerun; an interrupted one resumes
    from its last checkpoint (stopping `distill ablate` stops the variant's process too).
    Writes ablation.json, ablation.md and ablation.png in ablate.output_dir.
    """
    from pipeline.recipes.ablate import run_ablate

    if run_ablate(config, overrides)["failed"]:
        sys.exit(1)


@main.command("demo")
@click.option("--config", type=click.Path(dir_okay=False), default=None, help="Demo config (default: configs/demo.yaml).")
@set_option
@user_errors
def demo(config: str | None, overrides: tuple[str, ...]) -> None:
    """Run the chain on the embedded SmolLM2 teacher and Wikipedia corpus, offline.

    Prunes the teacher's 6 least important blocks (student.model), builds and verifies the cache,
    trains from it (training.output_dir) and prints held-out perplexity and KL of the teacher, the
    pruned and the distilled student (also written to training.output_dir/demo.json).
    """
    from pipeline.recipes.demo import DEMO_CONFIG, run_demo

    run_demo(config or DEMO_CONFIG, overrides)


if __name__ == "__main__":
    main()
