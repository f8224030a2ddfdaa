"""The examples a run trains on: a file tokenized and checked, replay data mixed in, rows packed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.data import cache
from trainer.data.parse import EVAL_FORMAT, LineError, iter_records, trains_inputs
from trainer.data.tokenize import REJECTED_IDS, fit_to_length, tokenize_stream, trained_in
from trainer.data.validate import validate_file
from trainer.errors import DataError


@dataclass
class TokenizedFile:
    examples: list[dict]
    truncated: int
    dropped: int  # examples with no trained token left after truncation
    format: str = "chat"
    cached: bool = False  # read from the token cache (tokenized by the data check or an earlier run)


def _tokenized(path: str | Path, tokenizer: Any, fmt: str, train_on_inputs: bool | None,
               what: str) -> tuple[list[dict], bool]:
    """Every example of the file before any cut, and whether it came from the data check's cache
    (else it is tokenized now, and kept for the next run)."""
    key = cache.key(path, tokenizer, fmt, train_on_inputs)
    cached = cache.load(key)
    if cached is not None:
        return cached, True
    done = []
    records = (((number, rec), None if isinstance(rec, LineError) else rec, trains_inputs(fmt, train_on_inputs))
               for number, _, rec in iter_records(path, fmt))
    for (number, rec), ex in tokenize_stream(tokenizer, records):
        err = rec if isinstance(rec, LineError) else ex
        if isinstance(err, LineError):
            raise DataError(f"{what}: line {number}: {err.message}") from err
        done.append(ex)
    cache.save(key, done)
    return done, False


def load_tokenized(
    path: str | Path,
    tokenizer: Any,
    max_seq_len: int,
    what: str = "training_file",
    data_format: str = "auto",
    train_on_inputs: bool | None = None,
) -> TokenizedFile:
    """Every example of a file, tokenized; DataError naming the first bad lines if any is bad."""
    report = validate_file(path, None, data_format=data_format)
    if not report["valid"]:
        first = "; ".join(f"line {e['line']}: {e['message']}" for e in report["errors"][:3])
        total = sum(report["error_counts"].values())
        raise DataError(
            f"{what}: {total} invalid line(s): {first}",
            hint="run `python -m trainer validate FILE` for the full report",
        )
    fmt = report["format"]
    if fmt == EVAL_FORMAT:
        raise DataError(f"{what}: this is an eval file (lines with 'expected' answers), nothing to train on",
                        hint="name it in eval.file")
    examples, truncated, dropped = [], 0, 0
    tokenized, cached = _tokenized(path, tokenizer, fmt, train_on_inputs, what)
    for ex in tokenized:
        pieces = fit_to_length(ex, fmt, max_seq_len)
        truncated += fmt != "text" and max(len(ex["input_ids"]), len(ex.get(REJECTED_IDS, ()))) > max_seq_len
        for piece in pieces:
            if not trained_in(piece):
                dropped += fmt != "text"
                continue
            examples.append(piece)
    if not examples:
        raise DataError(
            f"{what}: no example has a trained token within max_seq_len {max_seq_len}",
            hint="raise hyperparameters.max_seq_len",
        )
    return TokenizedFile(examples, truncated, dropped, fmt, cached)


def mix_in(examples: list[dict], sources: list[tuple[list[dict], float]], seed: int) -> tuple[list[dict], list[int]]:
    """The training examples plus round(weight * len(examples)) of each source's, and those counts.

    A source's examples are taken in a seeded order and repeat only when the weight asks for more
    than the source holds, so a large general corpus contributes distinct examples.
    """
    import numpy as np

    mixed, taken = list(examples), []
    for k, (source, weight) in enumerate(sources):
        want = max(1, round(weight * len(examples)))
        rng = np.random.default_rng([seed, 1_000_003, k])
        chosen: list[int] = []
        while len(chosen) < want:
            chosen.extend(rng.permutation(len(source))[: want - len(chosen)].tolist())
        mixed.extend(source[i] for i in chosen)
        taken.append(want)
    return mixed, taken


def pack(examples: list[dict], max_seq_len: int) -> list[dict]:
    """Rows of up to max_seq_len tokens holding whole examples, best-fit decreasing.

    Each row carries position_ids that restart at 0 for every example: the model's attention
    (transformers' packed-sequence masks for sdpa and flash attention) reads the restarts as
    example boundaries, so no token attends to another example, and RoPE positions equal those
    of the example on its own.
    """
    import bisect

    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted, for the tightest fit
    for i in order:
        n = len(examples[i]["input_ids"])
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, r = free.pop(at)
            rows[r].append(i)
            if room - n > 0:
                bisect.insort(free, (room - n, r))
        else:
            rows.append([i])
            if max_seq_len - n > 0:
                bisect.insort(free, (max_seq_len - n, len(rows) - 1))
    packed = []
    for members in rows:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in members:
            ex = examples[i]
            ids += ex["input_ids"]
            labels += ex["labels"]
            positions += range(len(ex["input_ids"]))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return packed
