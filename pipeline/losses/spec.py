"""The compound loss's settings, checked against the loss registries before anything loads.

    L = alpha * CE + beta * logits(T, tail; logits_args) + gamma * hidden + delta * dynamics

`LossSpec.checked()` resolves the divergence's parameters (declared defaults filled in, names and ranges
checked) and looks every registry name up, so a typo is a one-line error before any model is loaded
or any folder is created, not a failure inside the first training step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pipeline.losses.dynamics import DYNAMICS_LOSSES
from pipeline.losses.hidden import HIDDEN_LOSSES
from pipeline.losses.logits import TAIL_MODES, check_logits_args
from pipeline.losses.sampled import check_sampled_divergence


@dataclass
class LossSpec:
    alpha: float = 0.4
    beta: float = 0.4
    gamma: float = 0.2
    delta: float = 0.0
    temperature: float = 2.0
    logits: str = "kl"
    logits_args: dict[str, float] = field(default_factory=dict)
    tail: str = "bucket"
    hidden: str = "cosine"
    dynamics: str = "fdd"
    chunk_tokens: int | str = "auto"  # rows per chunk, auto (by device) or 0 = dense (pipeline/losses/chunked.py)
    # auto | topk | sampled (pipeline/losses/sampled.py) | exact; the recipe resolves auto from the cache, and
    # the proposal temperature of sampled targets from its manifest
    logits_source: str = "auto"
    proposal_temperature: float | None = None
    preset: str | None = None  # where the defaults came from (for the record only)

    def checked(self) -> "LossSpec":
        """A copy with logits_args resolved; unknown names or parameters -> PipelineError."""
        args = check_logits_args(self.logits, self.logits_args)
        if self.logits_source == "sampled":
            check_sampled_divergence(self.logits)
        TAIL_MODES.get(self.tail)
        HIDDEN_LOSSES.get(self.hidden)
        DYNAMICS_LOSSES.get(self.dynamics)
        return dataclasses.replace(self, logits_args=args)

    def _targets(self) -> str:
        if self.logits_source == "exact":
            return "exact targets"
        if self.logits_source == "sampled":
            tp = f", proposal T={self.proposal_temperature:g}" if self.proposal_temperature is not None else ""
            return f"sampled targets{tp}"
        return f"tail {self.tail}"

    @property
    def needs_states(self) -> bool:
        """Whether the student's block outputs and the teacher's mapped layers take part in the loss."""
        return self.gamma > 0 or self.delta > 0

    def describe(self) -> str:
        """One line: the weighted terms that take part (weight > 0), e.g. `0.4 ce + 0.4 kl(T=2, bucket)`."""
        args = ", ".join(f"{k}={v:g}" for k, v in self.logits_args.items())
        terms = [
            (self.alpha, "ce"),
            (self.beta, f"{self.logits}({args + '; ' if args else ''}T={self.temperature:g}, {self._targets()})"),
            (self.gamma, f"{self.hidden} hidden"),
            (self.delta, self.dynamics),
        ]
        text = " + ".join(f"{w:g} {name}" for w, name in terms if w > 0) or "0"
        return f"{text}{f' (preset {self.preset})' if self.preset else ''}"
