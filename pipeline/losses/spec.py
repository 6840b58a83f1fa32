"""The compound loss's settings: the config's `loss:` section, checked against the loss registries before
anything loads.

    L = alpha * CE + beta * logits(T, tail; logits_args) + gamma * hidden + delta * dynamics

`LossSpec` is both the YAML schema of `loss:` (field metadata, read by pipeline/config.py) and what the
trainer reads. `checked()` resolves the divergence's parameters (declared defaults filled in, names and
ranges checked) and looks every registry name up, so a typo is a one-line error before any model is loaded
or any folder is created, not a failure inside the first training step. Which teacher targets the
divergence reads (`logits_source`) is resolved against the teacher side by pipeline/targets.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Union

from pipeline import targets
from pipeline.schema import bounded, choice

if TYPE_CHECKING:
    from pipeline.targets import TargetSource


@dataclass
class LossSpec:
    preset: Union[str, None] = None  # LOSS_PRESETS name (pipeline/config.py); filled in from the raw mapping
    alpha: float = field(default=0.4, metadata=bounded(0.0, None))
    beta: float = field(default=0.4, metadata=bounded(0.0, None))
    gamma: float = field(default=0.2, metadata=bounded(0.0, None))
    delta: float = field(default=0.0, metadata=bounded(0.0, None))  # feature-dynamics (FDD) loss weight
    temperature: float = field(default=2.0, metadata=bounded(0.0, None, lo_open=True))
    logits: str = "kl"  # divergence: registry name, checked (with logits_args) before anything loads
    logits_args: dict[str, float] = field(default_factory=dict)  # the divergence's parameters, e.g. {beta: 0.3}
    tail: str = field(default="bucket", metadata=choice("bucket", "renormalize"))
    hidden: str = "cosine"
    dynamics: str = "fdd"  # dynamics loss: registry name
    # CE and the divergence from the final hidden states, this many valid tokens at a time (the full
    # [tokens, vocab] logits never exist); auto = sized for the device (pipeline/losses/chunked.py: 512 on a
    # CPU, on a GPU a [chunk, vocab] fp32 buffer of 1/64 of its memory); 0 = the dense path (the reference)
    chunk_tokens: Union[int, Literal["auto"]] = "auto"
    # which teacher targets the divergence reads (pipeline/targets.py): auto = exact when the teacher side holds
    # them, else top-k, else draws; topk (tail bucket / renormalize), sampled (the unbiased importance-weighted
    # estimate, kl and skew_kl), exact (the full distribution, every divergence)
    logits_source: str = field(default="auto", metadata=choice(*targets.SOURCES))
    # accepted spellings of logits_args.lambda (folded into it at load): DistiLLM's lambda, the book's s = 1 - lambda
    skew_lambda: Union[float, None] = None  # [0, 1); 0 = plain KL
    skew_alpha: Union[float, None] = None  # (0, 1]; 1 = plain KL

    def checked(self, source: "TargetSource | None" = None) -> "LossSpec":
        """A copy with logits_args resolved; unknown names or parameters -> PipelineError. With the resolved
        `source`, also that the divergence has an estimate on those targets (sampled: kl and skew_kl only)."""
        from pipeline.losses.dynamics import DYNAMICS_LOSSES
        from pipeline.losses.hidden import HIDDEN_LOSSES
        from pipeline.losses.logits import TAIL_MODES, check_logits_args
        from pipeline.losses.sampled import check_sampled_divergence

        args = check_logits_args(self.logits, self.logits_args)
        kind = source.kind if source is not None else targets.BY_NAME.get(self.logits_source)
        if kind is targets.SAMPLED:
            check_sampled_divergence(self.logits)
        TAIL_MODES.get(self.tail)
        HIDDEN_LOSSES.get(self.hidden)
        DYNAMICS_LOSSES.get(self.dynamics)
        return dataclasses.replace(self, logits_args=args)

    @property
    def needs_states(self) -> bool:
        """Whether the student's block outputs and the teacher's mapped layers take part in the loss."""
        return self.gamma > 0 or self.delta > 0

    def describe(self, source: "TargetSource | None" = None) -> str:
        """One line: the weighted terms that take part (weight > 0), e.g. `0.4 ce + 0.4 kl(T=2, tail bucket)`;
        the targets as `source` resolved them (else the tail mode)."""
        args = ", ".join(f"{k}={v:g}" for k, v in self.logits_args.items())
        targets = source.describe(self.tail) if source is not None else f"tail {self.tail}"
        terms = [
            (self.alpha, "ce"),
            (self.beta, f"{self.logits}({args + '; ' if args else ''}T={self.temperature:g}, {targets})"),
            (self.gamma, f"{self.hidden} hidden"),
            (self.delta, self.dynamics),
        ]
        text = " + ".join(f"{w:g} {name}" for w, name in terms if w > 0) or "0"
        return f"{text}{f' (preset {self.preset})' if self.preset else ''}"
