"""The data check's tokenization is kept for the trainer: load_tokenized then reads, not tokenizes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import trainer.data.dataset as data
from trainer.data.dataset import load_tokenized
from trainer.data.validate import validate_file
from trainer.tiny import build_tokenizer


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TUNEQ_TOKEN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def chat_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"question {i} " * (i + 1)},
                          {"role": "assistant", "content": f"answer {i} " * (2 * i + 1)}]} for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _count_tokenizing(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per record the trainer tokenizes itself (not read from the cache)."""
    calls: list[int] = []
    real = data.tokenize_stream

    def counted(tokenizer, items, *args, **kwargs):
        for tag, ex in real(tokenizer, items, *args, **kwargs):
            calls.append(1)
            yield tag, ex

    monkeypatch.setattr(data, "tokenize_stream", counted)
    return calls


def test_the_trainer_reads_what_the_data_check_tokenized(cache, chat_file, monkeypatch) -> None:
    tok = build_tokenizer()
    fresh = load_tokenized(chat_file, tok, 16, data_format="chat")  # tokenizes (cache off below)
    for f in cache.glob("*.npz"):
        f.unlink()
    assert validate_file(chat_file, tok, 16, "chat")["valid"]
    assert len(list(cache.glob("*.npz"))) == 1
    calls = _count_tokenizing(monkeypatch)
    got = load_tokenized(chat_file, tok, 16, data_format="chat")
    assert calls == []  # nothing tokenized again
    assert got.examples == fresh.examples and (got.truncated, got.dropped) == (fresh.truncated, fresh.dropped)


def test_a_rewritten_file_is_tokenized_again(cache, chat_file, monkeypatch) -> None:
    tok = build_tokenizer()
    validate_file(chat_file, tok, 64, "chat")
    chat_file.write_text(chat_file.read_text().replace("answer", "reply"))
    os.utime(chat_file, ns=(1, 1))  # a different modification time, whatever the clock's resolution
    calls = _count_tokenizing(monkeypatch)
    got = load_tokenized(chat_file, tok, 64, data_format="chat")
    assert len(calls) == 6
    assert any(tok.convert_tokens_to_ids("reply") in ex["input_ids"] for ex in got.examples) or got.examples


def test_off_means_no_cache(tmp_path, chat_file, monkeypatch) -> None:
    monkeypatch.setenv("TUNEQ_TOKEN_CACHE_DIR", "off")
    tok = build_tokenizer()
    validate_file(chat_file, tok, 64, "chat")
    calls = _count_tokenizing(monkeypatch)
    load_tokenized(chat_file, tok, 64, data_format="chat")
    assert len(calls) == 6


def test_the_folder_stays_under_its_bound_and_keeps_what_was_used_last(cache, monkeypatch) -> None:
    """Every upload adds an entry, so the folder is bounded: a save past the bound removes the
    entries used longest ago, a hit counts as a use, and the entry just written stays."""
    import time

    from trainer.data import cache as tokens

    rows = [{"input_ids": list(range(1000)), "labels": list(range(1000))}]  # about 8 KB stored
    tokens.save("a", rows)
    size = (cache / "a.npz").stat().st_size
    monkeypatch.setenv(tokens.MAX_ENV, str(3.5 * size / 2**20))  # room for three entries
    for k in ("b", "c"):
        time.sleep(0.01)  # distinct modification times
        tokens.save(k, rows)
    time.sleep(0.01)
    assert tokens.load("a") == rows  # a hit: "a" is now the one used last
    time.sleep(0.01)
    tokens.save("d", rows)
    assert sorted(p.stem for p in cache.glob("*.npz")) == ["a", "c", "d"]  # "b" was used longest ago
    assert tokens.load("b") is None

    monkeypatch.setenv(tokens.MAX_ENV, "0.000001")  # smaller than one entry: only the newest stays
    tokens.save("e", rows)
    assert [p.stem for p in cache.glob("*.npz")] == ["e"] and tokens.load("e") == rows
