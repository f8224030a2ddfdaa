"""Size limits of training data that need the data itself: examples per file, tokens per file.

Examples are counted when a file is uploaded. Tokens depend on the model's tokenizer, which a
file does not know until a job names the model, so they are counted when a job is created.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from api.errors import APIError
from core.models import File
from core.settings import Settings


def check_examples(report: dict[str, Any], settings: Settings) -> None:
    examples = int(report.get("examples") or 0)
    if examples > settings.max_examples_per_file:
        raise APIError(
            413, f"file: {examples} examples, more than the {settings.max_examples_per_file} a file may hold "
            "(TUNEQ_MAX_EXAMPLES_PER_FILE); split it", param="file", code="too_many_examples",
        )


def check_file_tokens(f: File, param: str, model_path: str, max_seq_len: int, settings: Settings,
                      data_format: str = "auto", train_on_inputs: bool | None = None, *, in_child: bool = False) -> None:
    """Refuse a file with more tokens than allowed, counted as training would see them.

    Hub models (TUNEQ_ALLOW_HUB_MODELS) are not downloaded by the API, so for them the count is
    left to the upload, example and step limits.
    """
    if not Path(model_path).is_dir():
        return
    from trainer.errors import ModelError

    from api.validation import token_report

    # The job's data check asks for the same report, so a file is tokenized once (then cached).
    try:
        tokens = int(token_report(f, model_path, max_seq_len, data_format, train_on_inputs,
                                  in_child=in_child, param=param).get("tokens") or 0)
    except ModelError as exc:
        raise APIError(400, str(exc), param="model", code="model_unusable") from None
    if tokens > settings.max_tokens_per_file:
        raise APIError(
            413, f"{param}: file {f.id} holds {tokens} tokens for this model, more than the "
            f"{settings.max_tokens_per_file} a file may hold (TUNEQ_MAX_TOKENS_PER_FILE)", param=param,
            code="too_many_tokens",
        )
