"""`distill prune`: make the student, top to bottom.

    check the request (names, sizes, output folder) before anything heavy
    load the source model and tokenizer
    build calibration rows (importance) and held-out rows (scoring) from one corpus
    one calibration pass -> block, neuron, head and channel importance
    plan each candidate (depth method x amount, plus the width target) and build it
    score candidates on held-out text: perplexity and KL to the unpruned model
    write the best to DIR.tmp (HF folder + pruning.json [+ candidates.json]), then os.replace to DIR
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from pipeline.config import SourceConfig
from pipeline.data.sequences import build_sequences
from pipeline.errors import PipelineError
from pipeline.evaluate.perplexity import heldout_scores
from pipeline.registry import Registry
from pipeline.sources.corpus import mix_documents
from pipeline.atomic import write_folder_atomically
from pipeline.sources.models import load_config, load_model
from pipeline.student.architectures import arch_spec
from pipeline.student.importance import WIDTH_IMPORTANCE, BlockScores, collect_stats
from pipeline.student.prune import (
    DEPTH_METHODS,
    RECORD_FILE,
    PrunePlan,
    build_pruned,
    check_width,
    plan_width,
    pruning_record,
    removable_blocks,
    resolve_amount,
    select_depth,
)

CANDIDATES_FILE = "candidates.json"

# candidate row -> sort key (lower = better)
CANDIDATE_SELECTION: Registry[Callable[[dict], float]] = Registry("candidate selection")
CANDIDATE_SELECTION.register("kl")(lambda row: row["kl"])
CANDIDATE_SELECTION.register("perplexity")(lambda row: row["perplexity"])


@dataclass
class DepthSpec:
    name: str  # as the user wrote it, e.g. "importance:6"
    method: str
    n_remove: int


def parse_candidates(items: list[str], num_layers: int) -> list[DepthSpec]:
    """'importance:6,last:0.2' (repeatable) -> depth specs; methods checked against the registry."""
    specs: list[DepthSpec] = []
    for item in items:
        for part in (p.strip() for p in item.split(",")):
            if not part:
                continue
            if ":" not in part:
                raise PipelineError(f"--candidates {part!r}: expected METHOD:AMOUNT, e.g. importance:6")
            method, amount = (s.strip() for s in part.split(":", 1))
            DEPTH_METHODS.get(method)
            if any(s.name == part for s in specs):
                raise PipelineError(f"--candidates: {part!r} is listed twice")
            specs.append(DepthSpec(part, method, resolve_amount(amount, num_layers, f"--candidates {method}:")))
    if not specs:
        raise PipelineError("--candidates: no candidate given")
    return specs


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PipelineError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PipelineError(f"--out {out} is not empty; pass --overwrite to replace it")


def _dumps(record: dict) -> str:
    """One top-level key per line, values compact (kept-neuron lists stay one line); a list of rows, a row a line."""

    def value(v) -> str:
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            return "[\n" + ",\n".join(f"  {json.dumps(x)}" for x in v) + "\n ]"
        return json.dumps(v)

    body = ",\n".join(f" {json.dumps(k)}: {value(v)}" for k, v in record.items())
    return "{\n" + body + "\n}\n"


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once


def _table(rows: list[dict]) -> str:
    head = f"{'candidate':<22} {'removed blocks':<26} {'params':>9} {'perplexity':>12} {'KL':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        removed = ",".join(map(str, r["removed_layers"])) or "-"
        lines.append(
            f"{r['name']:<22} {removed:<26} {r['params'] / 1e6:>8.1f}M {r['perplexity']:>12.4g} {r['kl']:>8.3f}"
        )
    return "\n".join(lines)


def run_prune(
    model: str,
    out: str,
    *,
    method: str | None = None,
    remove: str | None = None,
    keep_first: int = 0,
    keep_last: int = 0,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_heads: int | None = None,
    width_importance: str = "activation",
    calibration: str = "wiki-vital",
    text_field: str = "text",
    calibration_sequences: int = 64,
    heldout_sequences: int = 16,
    seq_len: int = 256,
    batch_size: int = 4,
    candidates: tuple[str, ...] = (),
    select_by: str = "kl",
    dtype: str = "float32",
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict:
    """Prune `model` into the HF folder `out`; returns the pruning record (also `out/pruning.json`)."""
    # 1. check the request before loading anything heavy
    out_dir = Path(out)
    _check_out(out_dir, overwrite)
    WIDTH_IMPORTANCE.get(width_importance)
    select_key = CANDIDATE_SELECTION.get(select_by)
    for flag, value, least in (("--calibration-sequences", calibration_sequences, 1), ("--seq-len", seq_len, 2),
                               ("--batch-size", batch_size, 1), ("--heldout-sequences", heldout_sequences, 0)):
        if value < least:
            raise PipelineError(f"{flag} {value}: must be >= {least}")
    src_config = load_config(model)
    spec = arch_spec(src_config)
    n_layers = src_config.num_hidden_layers
    if candidates:
        if method is not None or remove is not None:
            raise PipelineError("use either --candidates or --method/--remove, not both")
        if heldout_sequences < 1:
            raise PipelineError("--candidates are scored on held-out text: --heldout-sequences must be >= 1")
        depth_specs = parse_candidates(list(candidates), n_layers)
    else:
        method = method or "importance"
        DEPTH_METHODS.get(method)
        n = resolve_amount(remove if remove is not None else "0", n_layers)
        depth_specs = [DepthSpec(f"{method}:{remove}" if n else "width-only", method, n)]
    for d in depth_specs:
        removable_blocks(n_layers, d.n_remove, keep_first, keep_last)
    target = check_width(src_config, hidden_size, intermediate_size, num_heads)
    if all(d.n_remove == 0 for d in depth_specs) and not target.any():
        raise PipelineError("nothing to prune: give --remove, --candidates, --hidden-size, --intermediate-size or --num-heads")

    # 2. source model and calibration / held-out rows (packed: every token valid)
    teacher, tokenizer = load_model(model, dtype)
    total = calibration_sequences + heldout_sequences
    docs = mix_documents([SourceConfig(path=calibration)], text_field, seed)
    seqs = build_sequences(docs, tokenizer, seq_len, total, heldout_sequences / total, True, seed)
    calib_ids, held_ids = seqs.input_ids[: seqs.n_train], seqs.input_ids[seqs.n_train :]  # [N, T] int32

    # 3. importance (one pass)
    stats = collect_stats(teacher, spec, calib_ids, None, batch_size, progress=progress)
    block_scores = BlockScores(stats.boundary_cos)
    width_scores = WIDTH_IMPORTANCE.get(width_importance)(teacher, spec, stats) if target.any() else None

    # 4. plan and build every candidate (tensors left whole are shared with the teacher)
    built: dict[str, tuple[DepthSpec, PrunePlan, nn.Module]] = {}
    for d in depth_specs:
        removed = select_depth(d.method, block_scores, n_layers, d.n_remove, keep_first, keep_last)
        kept = [b for b in range(1, n_layers + 1) if b not in removed]
        plan = plan_width(src_config, width_scores, kept, target) if width_scores is not None else PrunePlan(kept)
        built[d.name] = (d, plan, build_pruned(teacher, plan))

    # 5. held-out scoring and choice
    rows: list[dict] = []
    if heldout_sequences > 0:
        scores = heldout_scores(teacher, {k: v[2] for k, v in built.items()}, held_ids, None, batch_size, progress)
        rows.append({"name": "unpruned", "method": None, "removed_layers": [], "params": _param_count(teacher),
                     **scores["reference"]})
        for name, (d, plan, student) in built.items():
            removed = [b for b in range(1, n_layers + 1) if b not in plan.kept_layers]
            rows.append({"name": name, "method": d.method if d.n_remove else None, "removed_layers": removed,
                         "kept_layers": plan.kept_layers, "params": _param_count(student), **scores[name]})
    best_name = min(rows[1:], key=select_key)["name"] if candidates else depth_specs[0].name
    best_spec, best_plan, best_model = built[best_name]
    if candidates:
        echo(_table(rows))
        echo(f"best by {select_by}: {best_name}")

    # 6. record and write
    calib_info = {"source": calibration, "text_field": text_field, "sequences": int(seqs.n_train),
                  "heldout_sequences": int(seqs.n_heldout), "seq_len": seq_len, "tokens": stats.tokens,
                  "seed": seed, "digest": seqs.digest()}
    record = pruning_record(
        model, src_config, best_model.config, best_plan,
        best_spec.method if best_spec.n_remove else None,
        width_importance if target.any() else None, block_scores, calib_info,
    )
    if rows:
        best_row = next(r for r in rows if r["name"] == best_name)
        record["heldout"] = {"sequences": int(seqs.n_heldout), "source_perplexity": rows[0]["perplexity"],
                             "perplexity": best_row["perplexity"], "kl_to_source": best_row["kl"]}
    if candidates:
        record["candidate"] = best_name
    table = {"select_by": select_by, "best": best_name, "heldout_sequences": int(seqs.n_heldout),
             "seq_len": seq_len, "rows": rows}

    def write(tmp: Path) -> None:
        best_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / RECORD_FILE).write_text(_dumps(record))
        if candidates:
            (tmp / CANDIDATES_FILE).write_text(_dumps(table))

    write_folder_atomically(out_dir, write)
    old, new = record["sizes"]["old"], record["sizes"]["new"]
    summary = (f"{out_dir}: {old['num_hidden_layers']} -> {new['num_hidden_layers']} blocks, hidden "
               f"{old['hidden_size']} -> {new['hidden_size']}, MLP {old['intermediate_size']} -> "
               f"{new['intermediate_size']}, heads {old['num_attention_heads']} -> {new['num_attention_heads']}")
    if record["removed_layers"]:
        summary += f"; removed blocks {','.join(map(str, record['removed_layers']))}"
    if "heldout" in record:
        h = record["heldout"]
        summary += f"; held-out perplexity {h['source_perplexity']:.4g} -> {h['perplexity']:.4g}, KL {h['kl_to_source']:.3f}"
    echo(summary)
    return record
