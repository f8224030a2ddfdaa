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
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

ENV = "TUNEQ_TOKEN_CACHE_DIR"


def folder() -> Path | None:
    raw = os.environ.get(ENV, "").strip()
    if raw.lower() in ("off", "0", "none", "false"):
        return None
    return Path(raw) if raw else Path.home() / ".cache" / "tuneq" / "tokenized"


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
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def load(k: str | None) -> list[dict] | None:
    """The examples of an entry, or None."""
    where = folder()
    if k is None or where is None:
        return None
    import numpy as np

    try:
        with np.load(where / f"{k}.npz") as z:
            ids, labels, lengths = z["ids"], z["labels"], z["lengths"]
    except (OSError, KeyError, ValueError):
        return None
    ends = np.cumsum(lengths).tolist()
    ids_l, labels_l = ids.tolist(), labels.tolist()
    out, start = [], 0
    for end in ends:
        out.append({"input_ids": ids_l[start:end], "labels": labels_l[start:end]})
        start = end
    return out


def save(k: str | None, examples: list[dict]) -> None:
    where = folder()
    if k is None or where is None or not examples:
        return
    import numpy as np

    try:
        where.mkdir(parents=True, exist_ok=True)
        tmp = where / f".{k}.{os.getpid()}.npz"
        np.savez(tmp, ids=np.fromiter((t for e in examples for t in e["input_ids"]), dtype=np.int64),
                 labels=np.fromiter((t for e in examples for t in e["labels"]), dtype=np.int64),
                 lengths=np.array([len(e["input_ids"]) for e in examples], dtype=np.int64))
        os.replace(tmp, where / f"{k}.npz")
    except OSError:
        pass
