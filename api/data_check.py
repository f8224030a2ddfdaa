"""The data check of a job: its files tokenized with the job's own tokenizer and max_seq_len.

An upload cannot know the model, so token counts, truncation and examples that would lose every
trained token are only known when a job names one. A job whose examples would all be cut away
is refused here, before it reaches a worker; otherwise the counts go on the job as an event.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from api.errors import APIError
from core.models import File
from trainer.data.parse import EVAL_FORMAT

STAT_KEYS = ("format", "examples", "tokens", "trained_tokens", "longest", "truncated", "dropped")


@lru_cache(maxsize=4)
def model_tokenizer(model_dir: str) -> Any:
    """The tokenizer of a local base model, loaded once per API process (data checks, chat prompts)."""
    from api import heap
    from trainer.model import load_tokenizer  # heavy import, only when a job is created

    tokenizer = load_tokenizer(model_dir)
    heap.settle()  # the tokenizer and its libraries stay: no full collection walks them again
    return tokenizer


@lru_cache(maxsize=256)
def token_report(
    storage_path: str, sha256: str, model_dir: str, max_seq_len: int,
    data_format: str = "auto", train_on_inputs: bool | None = None,
) -> dict[str, Any]:
    """trainer.data.validate.validate_file with the model's tokenizer; cached, the file is read once per job shape.

    sha256 is part of the key so a rewritten file is never served a stale report.
    """
    from trainer.data.validate import validate_file

    return validate_file(storage_path, model_tokenizer(model_dir), max_seq_len, data_format, train_on_inputs)


def check_file(f: File, param: str, model_path: str, max_seq_len: int, data_format: str = "auto",
               train_on_inputs: bool | None = None, *, in_child: bool = False) -> dict[str, Any] | None:
    """The file's token statistics for this job; APIError if the job could not train on it.

    None for a hub model the API does not load (TUNEQ_ALLOW_HUB_MODELS). The report comes from
    the token report cache (api.validation), else from tokenizing the file: here, or with
    in_child=True in the API's checking child process.
    """
    if not Path(model_path).is_dir():
        return None
    from api.validation import token_report as cached_token_report
    from trainer.errors import ModelError

    try:
        report = cached_token_report(f, model_path, max_seq_len, data_format, train_on_inputs, in_child=in_child,
                                     param=param)
    except ModelError as exc:
        raise APIError(400, str(exc), param="model", code="model_unusable") from None
    if not report["valid"]:
        # The upload check passed, so what fails is the format the job names, or the template.
        total = sum(report["error_counts"].values())
        shown = "; ".join(f"line {e['line']}: {e['message']}" for e in report["errors"][:5])
        raise APIError(400, f"{param}: file {f.id} has {total} line(s) this job cannot use: {shown}",
                       param=param, code="invalid_file")
    if report["format"] == EVAL_FORMAT and data_format != EVAL_FORMAT:
        raise APIError(400, f"{param}: file {f.id} is an eval file (lines with 'expected' answers), which holds nothing "
                       "to train on; name it in eval.file", param=param, code="invalid_file")
    if report["examples"] and report["dropped"] == report["examples"]:
        raise APIError(
            400, f"{param}: every example of file {f.id} loses all its trained tokens to max_seq_len {max_seq_len} "
            f"(longest example: {report['longest']} tokens); raise hyperparameters.max_seq_len",
            param=param, code="examples_truncated_away",
        )
    return {k: report[k] for k in STAT_KEYS}


def summary(stats: dict[str, dict[str, Any]], max_seq_len: int) -> str:
    parts = []
    for param, s in stats.items():
        part = f"{param}: {s['examples']} {s['format']} examples, {s['tokens']} tokens"
        if s["truncated"]:
            part += f", {s['truncated']} cut to max_seq_len {max_seq_len}"
        if s["dropped"]:
            part += f", {s['dropped']} with nothing left to train (skipped)"
        parts.append(part)
    return "; ".join(parts)
