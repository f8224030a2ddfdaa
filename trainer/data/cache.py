"""Tokenized files kept on disk, so that a job's trainer does not tokenize again what the API's
data check tokenized when the job was created (nor what an earlier run of the same job did).

What is kept is every example of a file as tokenize_record gives it before any cut (input_ids and
labels), so one entry serves every max_seq_len. The key is the file (absolute path, size,
modification time), the tokenizer (its name, vocabulary size and chat template) and how the
file is read (format, train_on_inputs): a rewritten file or another tokenizer is a miss, never a
stale hit. An entry is one .npz (all ids and labels end to end, and each example's length),
written to a temporary name and renamed, so a reader never sees half of one.

TUNEQ_TOKEN_CACHE_DIR names the folder (default ~/.cache/tuneq/tokenized; "off" disables it).
Nothing here is needed for correctness: a miss, an unreadable entry or a full disk just means
tokenizing as before.

An entry is worth keeping only while its file may still be trained on, and on a shared service
every upload adds one, so the folder is bounded: past TUNEQ_TOKEN_CACHE_MAX_MB (default
DEFAULT_MAX_MB) each save removes the entries used longest ago (a hit marks its entry used).
Token ids and labels are stored as int32, half of what int64 took: vocabularies are far below 2**31.
"""

from __future__ import annotations

import hashlib
import json
import os
from itertools import chain
from pathlib import Path
from typing import Any

from trainer.data.tokenize import REJECTED_IDS, REJECTED_LABELS

ENV = "TUNEQ_TOKEN_CACHE_DIR"
MAX_ENV = "TUNEQ_TOKEN_CACHE_MAX_MB"
DEFAULT_MAX_MB = 10240
# The key of a preference file's entry ends with this: its rows are pairs (see load).
PAIRED = "-pairs"


def folder() -> Path | None:
    raw = os.environ.get(ENV, "").strip()
    if raw.lower() in ("off", "0", "none", "false"):
        return None
    return Path(raw) if raw else Path.home() / ".cache" / "tuneq" / "tokenized"


def max_bytes() -> int:
    try:
        return max(0, int(float(os.environ.get(MAX_ENV, "").strip() or DEFAULT_MAX_MB) * 2**20))
    except ValueError:
        return DEFAULT_MAX_MB * 2**20


def key(path: str | Path, tokenizer: Any, data_format: str, train_on_inputs: bool | None) -> str | None:
    try:
        st = Path(path).stat()
    except OSError:
        return None
    template = getattr(tokenizer, "chat_template", None)
    parts = {
        "file": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
        "tokenizer": str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__)),
        "vocab": len(tokenizer) if hasattr(tokenizer, "__len__") else None,
        "template": hashlib.sha256(str(template).encode()).hexdigest(),
        "bos": getattr(tokenizer, "bos_token", None), "eos": getattr(tokenizer, "eos_token", None),
        "format": data_format, "train_on_inputs": train_on_inputs,
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
    return digest + (PAIRED if data_format == "preference" else "")


def load(k: str | None) -> list[dict] | None:
    """The examples of an entry, or None."""
    where = folder()
    if k is None or where is None:
        return None
    import numpy as np

    entry = where / f"{k}.npz"
    try:
        with np.load(entry) as z:
            ids, labels, lengths = z["ids"], z["labels"], z["lengths"]
        os.utime(entry)  # used now: the last entry the size bound removes
    except (OSError, KeyError, ValueError):
        return None
    ends = np.cumsum(lengths).tolist()
    ids_l, labels_l = ids.tolist(), labels.tolist()
    out, start = [], 0
    for end in ends:
        out.append({"input_ids": ids_l[start:end], "labels": labels_l[start:end]})
        start = end
    if k.endswith(PAIRED):  # preference pairs: each example's two rows, one after the other
        return [{**out[i], REJECTED_IDS: out[i + 1]["input_ids"], REJECTED_LABELS: out[i + 1]["labels"]}
                for i in range(0, len(out), 2)]
    return out


def _rows(examples: list[dict]) -> list[dict]:
    """One row per example, or a pair's two rows in turn."""
    if REJECTED_IDS not in examples[0]:
        return examples
    return [row for e in examples
            for row in (e, {"input_ids": e[REJECTED_IDS], "labels": e[REJECTED_LABELS]})]


def save(k: str | None, examples: list[dict]) -> None:
    where = folder()
    if k is None or where is None or not examples:
        return
    import numpy as np

    rows = _rows(examples)
    try:
        where.mkdir(parents=True, exist_ok=True)
        tmp = where / f".{k}.{os.getpid()}.npz"
        lengths = np.array([len(e["input_ids"]) for e in rows], dtype=np.int64)
        total = int(lengths.sum())
        np.savez(tmp, ids=np.fromiter(chain.from_iterable(e["input_ids"] for e in rows), dtype=np.int32, count=total),
                 labels=np.fromiter(chain.from_iterable(e["labels"] for e in rows), dtype=np.int32, count=total),
                 lengths=lengths)
        os.replace(tmp, where / f"{k}.npz")
    except OSError:
        return
    prune(where, max_bytes(), keep=where / f"{k}.npz")


def prune(where: Path, limit: int, keep: Path | None = None) -> None:
    """Remove the entries used longest ago until the folder holds at most `limit` bytes, `keep`
    (the entry just written) aside: the trainer reads it next. Other processes may prune or save
    at the same time: an entry already gone is skipped, a reader that loses one tokenizes again."""
    entries = []
    for path in where.glob("*.npz"):
        if path.name.startswith("."):
            continue  # another process's entry, still being written
        try:
            st = path.stat()
        except OSError:
            continue
        entries.append((path == keep, st.st_mtime, st.st_size, path))
    total = sum(size for _, _, size, _ in entries)
    for is_kept, _, size, path in sorted(entries):
        if total <= limit or is_kept:
            break
        try:
            path.unlink()
        except OSError:
            continue
        total -= size
