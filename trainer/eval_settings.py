"""The eval block of a job: a held-out file of prompts with expected answers, and its graders.

At every checkpoint and at the end the model answers each prompt (trainer.answers) and every
grader scores the answers against the expected ones (trainer.graders). The scores are named
`eval_<grader name>`; `export: {"select": "best", "metric": <grader name>}` picks the weights of
final/ by one of them. Part of trainer.spec.JobSpec; kept here so that the spec stays readable.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pydantic import Field, model_validator

from trainer.method_settings import StrictModel
from trainer.vocabulary import GRADER_TYPES, GraderType

if TYPE_CHECKING:
    from trainer.spec import JobSpec

# Grader names become metric and TensorBoard names (eval_<name>, eval/<name>).
NAME_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
MAX_PATTERN_CHARS = 500


class Grader(StrictModel):
    type: GraderType = Field(..., description=" | ".join(GRADER_TYPES) + ".")
    name: str | None = Field(
        None, pattern=NAME_PATTERN, description="The score's name, eval_<name> in metrics (default: the type)."
    )
    pattern: str | None = Field(
        None, min_length=1, max_length=MAX_PATTERN_CHARS,
        description="regex: a Python regular expression searched for in the answer (the expected answer is not used).",
    )
    ignore_case: bool = Field(False, description="Compare (or search) without regard to letter case.")

    @property
    def score_name(self) -> str:
        return self.name or self.type


class EvalSettings(StrictModel):
    file: str = Field(
        ..., min_length=1,
        description="JSONL of {'messages': [... ending with a user turn], 'expected': 'answer'} lines (the API "
        "takes a file id from POST /v1/files).",
    )
    graders: list[Grader] = Field(
        default_factory=lambda: [Grader(type="exact_match")], min_length=1, max_length=8,
        description="How answers are scored; each gives a mean score in [0, 1] named eval_<name>.",
    )
    max_new_tokens: int = Field(64, ge=1, le=1024, description="Tokens generated per answer at most.")
    batch_size: int = Field(16, ge=1, le=256, description="Prompts generated together.")
    max_examples: int = Field(256, ge=1, le=10_000, description="The first this many lines of the file are asked.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0: greedy decoding; above 0: sampling, seeded.")

    @model_validator(mode="after")
    def _graders(self) -> EvalSettings:
        seen: set[str] = set()
        for k, g in enumerate(self.graders):
            where = f"eval.graders[{k}]"
            if g.type == "regex":
                if g.pattern is None:
                    raise ValueError(f"{where}.pattern: required for a regex grader")
                try:
                    re.compile(g.pattern)
                except re.error as exc:
                    raise ValueError(f"{where}.pattern: does not compile: {exc}") from None
            elif g.pattern is not None:
                raise ValueError(f"{where}.pattern: only a regex grader takes a pattern, not {g.type!r}")
            if g.score_name in seen:
                raise ValueError(f"{where}.name: {g.score_name!r} is used twice; give the graders distinct names")
            seen.add(g.score_name)
        return self


def check_eval_settings(spec: JobSpec) -> None:
    """export.select best needs an eval block and one of its graders to select by."""
    export = spec.export
    if export.select != "best":
        if export.metric is not None:
            raise ValueError("export.metric: applies to export.select 'best'")
        return
    if spec.eval is None:
        raise ValueError("export.select: 'best' picks the weights by an eval score; give an eval block "
                         "(eval.file and eval.graders)")
    names = [g.score_name for g in spec.eval.graders]
    if export.metric is not None and export.metric not in names:
        raise ValueError(f"export.metric: {export.metric!r} is not a grader of eval.graders; allowed: {', '.join(names)}")


def selection_metric(spec: JobSpec) -> str | None:
    """The metric key (eval_<name>) that picks final/'s weights; None when the last step's are kept."""
    if spec.export.select != "best" or spec.eval is None:
        return None
    return "eval_" + (spec.export.metric or spec.eval.graders[0].score_name)
