"""What every script of the suite shares: the environment, random models, child runs and result rows.

Every script runs from the repository root as a module (`python -m scripts.bench.cache`), so `scripts` is
importable as a package and `pipeline` is the installed project: no script edits `sys.path`.

- **Environment.** Importing this module sets offline defaults (no hub, no tokenizer threads, the converted
  packaged models under the repository's cache/models); a script imports it before transformers, which
  reads them at import.
- **Random models.** `random_model(config)` is the one random-weight builder: a Llama-family causal LM with
  transformers' own initial distribution, filled in place on the meta device (seconds for a 1.2B model).
  `smollm2_config` and `llama1b_config` give the two shapes the suite uses; `save_model` writes a model folder
  with a tokenizer that `teacher.model` / `student.model` can point at.
- **Child runs.** `run_child("pkg.module", "function", kwargs)` runs one benchmark step in a fresh process,
  so that its peak memory and its imports are its own. The protocol: the child is
  `python -m scripts.harness MODULE FUNCTION JSON`; it imports MODULE, calls FUNCTION(**JSON) and prints
  `RESULT <json of the returned dict>` as a line of its stdout (the last such line counts). A child that
  fails, or names a function MODULE lacks (exit code 2), comes back as {"error": its stderr tail,
  "returncode": n}; either way with "child_s", its wall time.
- **Results.** `Results` appends one JSON line per result to a JSON-lines file as each result finishes (a
  run cut off by a time limit keeps every finished row); `table_header` / `table_row` print markdown tables
  row by row, and scripts/bench/summary.py turns the rows of a whole suite run into one table.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
PACKAGED_TEACHER = "smollm2-135m-instruct"

for _key, _value in {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                     "DISTILL_MODELS_DIR": str(ROOT / "cache" / "models")}.items():
    os.environ.setdefault(_key, _value)


def quiet_transformers() -> None:
    """No progress bars, errors only: the scripts print their own tables."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- random models

# Llama-3.2-1B's shape (its llama3 rope scaling changes no cost, so the default rope stands in for it)
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5)


def smollm2_config(source: str = PACKAGED_TEACHER, **overrides):
    """The SmolLM2-135M config (of the packaged teacher, or of the folder `source`), with `overrides`."""
    from pipeline.sources.models import load_config

    base = load_config(str(source))
    return base.__class__.from_dict({**base.to_dict(), **overrides})


def llama1b_config(tokenizer=None, **overrides):
    """A LlamaConfig of LLAMA_1B with `overrides`; the special token ids from `tokenizer` when given."""
    import transformers

    ids = {}
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    return transformers.LlamaConfig(**{**LLAMA_1B, **ids, **overrides})


def random_model(config, *, seed: int = 0, device="cpu", dtype=None, head_scale: float = 1.0):
    """A causal LM of `config` in eval mode with random weights: every matrix from normal(0,
    config.initializer_range), every norm weight 1 and bias 0, as transformers initialises a Llama-family
    model. Built on the meta device and filled in place: transformers' own initialisation of 1.2B parameters
    takes about three times as long on a CPU. `head_scale` multiplies the output embedding (the input one too
    when tied): a random head gives near-uniform logits, and a scaled one a top-k that means something."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to_empty(device=device)
    model.tie_weights()
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
            else:
                p.normal_(0.0, config.initializer_range, generator=gen)
        if head_scale != 1.0:
            model.get_output_embeddings().weight.mul_(head_scale)
    _rebuild_rotary(model, config, device)
    return model.eval()


def _rebuild_rotary(model, config, device) -> None:
    """The rotary embeddings' buffers are computed in their constructor, which the meta device skipped."""
    import torch

    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent, _, attr = name.rpartition(".")
            with torch.device(device):
                setattr(model.get_submodule(parent) if parent else model, attr, type(module)(config=config))


def save_model(model, folder: Path, tokenizer=PACKAGED_TEACHER) -> str:
    """`model` and a tokenizer (a loaded one, or a model spec to load it from) in `folder`; returns its path."""
    from pipeline.sources.models import load_tokenizer

    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


# ----------------------------------------------------------------------------- child runs

RESULT = "RESULT "
ERROR_TAIL = 4000  # characters of a failed child's stderr that come back


def run_child(module: str, function: str, kwargs: dict, timeout: float | None = None) -> dict:
    """`module.function(**kwargs)` in a fresh process (see the module docstring): its result dict, or
    {"error", "returncode"}; with "child_s", the child's wall time."""
    cmd = [sys.executable, "-m", "scripts.harness", module, function, json.dumps(kwargs)]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
        lines = [x for x in r.stdout.splitlines() if x.startswith(RESULT)]
        if r.returncode == 0 and lines:
            result = json.loads(lines[-1][len(RESULT):])
        else:
            result = {"error": (r.stderr or r.stdout)[-ERROR_TAIL:], "returncode": r.returncode}
    except subprocess.TimeoutExpired:
        result = {"error": f"timed out after {timeout} s", "returncode": None}
    result["child_s"] = time.perf_counter() - t0
    return result


def child_main(argv: list[str]) -> int:
    """The child's side: MODULE FUNCTION JSON -> `RESULT <json>` on stdout; exit 2 for a bad command line."""
    if len(argv) != 3:
        print("usage: python -m scripts.harness MODULE FUNCTION JSON_KWARGS", file=sys.stderr)
        return 2
    module, function, kwargs = argv
    fn = getattr(importlib.import_module(module), function, None)
    if not callable(fn):
        print(f"error: {module} has no child step {function!r}", file=sys.stderr)
        return 2
    quiet_transformers()
    result = fn(**json.loads(kwargs))
    print(RESULT + json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------- results


class Results:
    """The result rows of one benchmark run. `add(row)` stamps the row with the benchmark's name, appends it
    to `out` as one JSON line at once (the file opened and closed per row), and keeps it in `rows`.

    A row that the suite's summary table should show carries `case` (what was measured) and `headline` (a
    few {label: number} pairs); a failed result carries `error`."""

    def __init__(self, bench: str, out: str | Path | None = None):
        self.bench = bench
        self.out = Path(out).resolve() if out else None
        self.rows: list[dict] = []
        if self.out:
            self.out.parent.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict) -> dict:
        row = {"bench": self.bench, **row}
        self.rows.append(row)
        if self.out is not None:
            with open(self.out, "a") as f:
                f.write(json.dumps(row, default=_plain) + "\n")
        return row


def read_rows(path: Path) -> list[dict]:
    """The rows `Results` appended to `path`, in order ([] when there is no such file)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plain(value):
    """JSON for what json lacks: numpy scalars and arrays, paths, tuples of them."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def table_header(*columns: str) -> str:
    """A markdown table's two header lines; a column named with a leading '>' is right-aligned (numbers)."""
    names = [c.lstrip(">") for c in columns]
    rule = ["---:" if c.startswith(">") else "---" for c in columns]
    return "| " + " | ".join(names) + " |\n|" + "|".join(rule) + "|"


def table_row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def number(value) -> str:
    """A number for a summary cell: 3 significant digits, thousands separated."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
