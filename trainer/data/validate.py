"""The validation report of a training file: per-line errors, and token counts with a tokenizer.

Imports neither torch nor transformers (a test checks it), so that the API can validate an
upload without loading them; a tokenizer, when given, is the caller's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainer.data import cache
from trainer.data.parse import EVAL_FORMAT, EvalItem, LineError, iter_records, trains_inputs
from trainer.data.tokenize import REJECTED_IDS, fit_to_length, piece_tokens, prompt_ids, tokenize_stream, trained_in

MAX_REPORTED_ERRORS = 100


def validate_file(
    path: str | Path,
    tokenizer: Any = None,
    max_seq_len: int | None = None,
    data_format: str = "auto",
    train_on_inputs: bool | None = None,
) -> dict:
    """The validation report of docs/internals.md; streams the file, so any size fits in memory.

    With a tokenizer it also counts tokens as training would see them: `truncated` examples lose
    their end to max_seq_len, `dropped` ones would have no trained token left and be skipped.
    """
    errors: list[dict] = []
    counts: Counter[str] = Counter()
    examples = tokens = trained = truncated = dropped = longest = 0
    seen: list[str | None] = [None if data_format == "auto" else data_format]
    counter = [0]

    def fail(line: int, err: LineError) -> None:
        counts[err.code] += 1
        if len(errors) < MAX_REPORTED_ERRORS:
            errors.append({"line": line, "code": err.code, "message": err.message})

    p = Path(path)
    # Kept for the trainer (trainer.data.cache), when every line tokenizes.
    tokenized: list[dict] = []
    if not p.is_file():
        fail(0, LineError("file_not_found", f"{path} is not a readable file"))
    else:
        def items() -> Iterator[tuple[tuple[int, str | None, Any], Any, bool]]:
            # Records go to the tokenizer in chunks (tokenize_stream); the rest passes through in order.
            for number, fmt, rec in iter_records(p, data_format, counter):
                seen[0] = fmt or seen[0]  # the file's format once a line showed it, bad lines included
                tokenized_here = tokenizer is not None and not isinstance(rec, (LineError, EvalItem))
                yield (number, fmt, rec), rec if tokenized_here else None, trains_inputs(fmt, train_on_inputs)

        for (number, fmt, rec), ex in tokenize_stream(tokenizer, items()):
            if isinstance(rec, LineError):
                fail(number, rec)
                continue
            if isinstance(rec, EvalItem):
                # Asked, not trained: its tokens are the prompt's, none of them trained.
                if tokenizer is not None:
                    try:
                        n = len(prompt_ids(tokenizer, rec.messages))
                    except LineError as err:
                        fail(number, err)
                        continue
                    tokens, longest = tokens + n, max(longest, n)
                examples += 1
                continue
            if isinstance(ex, LineError):
                fail(number, ex)
                continue
            if ex is not None:
                tokenized.append({k: v for k, v in ex.items() if k != "truncated"})
                n = max(len(ex["input_ids"]), len(ex.get(REJECTED_IDS, ())))
                longest = max(longest, n)
                for piece in fit_to_length(ex, fmt, max_seq_len):
                    got = piece_tokens(piece)
                    tokens += got[0]
                    trained += got[1]
                if max_seq_len is not None and n > max_seq_len and fmt != "text":
                    truncated += 1
                    dropped += not trained_in(fit_to_length(ex, fmt, max_seq_len)[0])
            examples += 1
        if examples == 0 and not counts:
            fail(0, LineError("empty_file", "the file has no examples"))
    counted = tokenizer is not None
    seen_format = seen[0]
    if counted and not counts and seen_format not in (EVAL_FORMAT, None):
        cache.save(cache.key(p, tokenizer, seen_format, train_on_inputs), tokenized)
    return {
        "valid": not counts,
        # None when no line was an example of any format: the file has none to report.
        "format": seen_format,
        "lines": counter[0],
        "examples": examples,
        "errors": errors,
        "error_counts": dict(counts),
        "tokens": tokens if counted else None,
        "trained_tokens": trained if counted else None,
        "longest": longest if counted else None,
        "max_seq_len": max_seq_len if counted else None,
        "truncated": truncated if counted else None,
        "dropped": dropped if counted else None,
    }
