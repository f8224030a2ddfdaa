"""Data formats: detection, per-format validation, masks with EOS, train_on_inputs, streaming."""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path

import pytest

from tests.unit.conftest import write_jsonl
from tests.unit.test_trainer_data import trained_text
from trainer.data.dataset import load_tokenized
from trainer.data.parse import LineError, parse_record
from trainer.data.tokenize import IGNORE_INDEX, fit_to_length, tokenize_record
from trainer.data.validate import validate_file
from trainer.errors import DataError

ALPACA = {"instruction": "Reverse the word.", "input": "stone", "output": "enots"}
PROMPT_COMPLETION = {"prompt": "The capital of France is", "completion": " Paris."}
TEXT = {"text": "The river runs to the sea, and the sea is never full."}
CHAT = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def tok_line(tokenizer, obj: dict, fmt: str, train_on_inputs: bool = False) -> dict:
    return tokenize_record(tokenizer, parse_record(obj, fmt), None, train_on_inputs)


def test_alpaca_renders_through_the_chat_template_and_trains_the_output(tokenizer):
    ex = tok_line(tokenizer, ALPACA, "alpaca")
    assert trained_text(tokenizer, ex) == ["enots" + tokenizer.eos_token]
    text = tokenizer.decode(ex["input_ids"])
    assert "<|user|>\nReverse the word.\n\nstone" in text and "<|assistant|>\nenots" in text
    no_input = tok_line(tokenizer, {"instruction": "Say yes.", "output": "Yes."}, "alpaca")
    assert "Say yes.\n\n" not in tokenizer.decode(no_input["input_ids"])


def test_prompt_completion_trains_the_completion_and_eos(tokenizer):
    ex = tok_line(tokenizer, PROMPT_COMPLETION, "prompt_completion")
    assert trained_text(tokenizer, ex) == [" Paris." + tokenizer.eos_token]
    assert ex["input_ids"][0] == tokenizer.bos_token_id and ex["input_ids"][-1] == tokenizer.eos_token_id


def test_text_trains_every_token_after_the_first(tokenizer):
    ex = tok_line(tokenizer, TEXT, "text")
    assert ex["labels"][0] == IGNORE_INDEX
    assert ex["labels"][1:] == ex["input_ids"][1:]
    assert ex["input_ids"][-1] == tokenizer.eos_token_id


def test_train_on_inputs_trains_prompts_too(tokenizer):
    chat = tok_line(tokenizer, CHAT, "chat", train_on_inputs=True)
    # Everything after BOS, up to the template's trailing newline, which no one ever generates.
    assert trained_text(tokenizer, chat) == [tokenizer.decode(chat["input_ids"][1:]).rstrip()]
    assert "<|user|>" in trained_text(tokenizer, chat)[0]
    pc = tok_line(tokenizer, PROMPT_COMPLETION, "prompt_completion", train_on_inputs=True)
    assert trained_text(tokenizer, pc) == [tokenizer.decode(pc["input_ids"][1:])]
    assert trained_text(tokenizer, tok_line(tokenizer, CHAT, "chat")) == ["Hi." + tokenizer.eos_token]


def test_long_text_is_split_not_cut(tokenizer):
    ex = tok_line(tokenizer, {"text": " ".join(["word"] * 60)}, "text")
    pieces = fit_to_length(ex, "text", 16)
    assert sum(len(p["input_ids"]) for p in pieces) == len(ex["input_ids"])
    assert all(len(p["input_ids"]) <= 16 and p["labels"][0] == IGNORE_INDEX for p in pieces)
    chat = fit_to_length(ex, "chat", 16)
    assert len(chat) == 1 and chat[0]["input_ids"] == ex["input_ids"][:16]


@pytest.mark.parametrize(
    ("obj", "fmt", "code"),
    [
        ({"instruction": "Do it."}, "alpaca", "missing_field"),
        ({"instruction": "Do it.", "output": "  "}, "alpaca", "empty_content"),
        ({"instruction": 3, "output": "x"}, "alpaca", "invalid_type"),
        ({"prompt": "a"}, "prompt_completion", "missing_field"),
        ({"prompt": "a", "completion": ""}, "prompt_completion", "empty_content"),
        ({"text": ""}, "text", "empty_content"),
        ({"text": "hello"}, "alpaca", "wrong_format"),
        ({"body": "hello"}, "text", "unknown_format"),
        ({"text": "hello"}, "chat", "missing_messages"),
    ],
)
def test_schema_errors_per_format(obj, fmt, code):
    with pytest.raises(LineError) as info:
        parse_record(obj, fmt)
    assert info.value.code == code and info.value.message


@pytest.mark.parametrize(
    ("row", "fmt"), [(CHAT, "chat"), (ALPACA, "alpaca"), (PROMPT_COMPLETION, "prompt_completion"), (TEXT, "text")]
)
def test_format_is_detected_from_the_file(tmp_path: Path, tokenizer, row, fmt):
    path = write_jsonl(tmp_path / "f.jsonl", [row] * 3)
    report = validate_file(path, tokenizer, max_seq_len=64)
    assert report["valid"] and report["format"] == fmt and report["examples"] == 3
    assert report["tokens"] > 0 and 0 < report["trained_tokens"] < report["tokens"]
    assert load_tokenized(path, tokenizer, 64).format == fmt


def test_a_file_mixing_formats_names_the_odd_lines(tmp_path: Path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [ALPACA, TEXT, ALPACA, {"nothing": 1}, PROMPT_COMPLETION])
    report = validate_file(path)
    assert report["format"] == "alpaca" and report["examples"] == 2
    assert [(e["line"], e["code"]) for e in report["errors"]] == [
        (2, "wrong_format"), (4, "unknown_format"), (5, "wrong_format"),
    ]
    assert "text" in report["errors"][0]["message"] and "alpaca" in report["errors"][0]["message"]
    # A format named in the spec wins over detection.
    named = validate_file(path, data_format="text")
    assert named["format"] == "text" and named["examples"] == 1


def test_a_file_with_no_example_of_any_format_reports_no_format(tmp_path: Path):
    """The report's format is the file's: none when no line showed one, the detected one when
    every line of it is broken."""
    unknown = validate_file(write_jsonl(tmp_path / "u.jsonl", [{"nothing": 1}, [1, 2], {"body": "x"}]))
    assert not unknown["valid"] and unknown["format"] is None
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    assert validate_file(empty)["format"] is None
    broken = validate_file(write_jsonl(tmp_path / "b.jsonl", [{"nothing": 1}, {"instruction": "Do it."}]))
    assert not broken["valid"] and broken["format"] == "alpaca"


def test_token_statistics_count_truncated_and_dropped_examples(tmp_path: Path, tokenizer):
    long_prompt = {"prompt": " ".join(["word"] * 40), "completion": " done."}
    path = write_jsonl(tmp_path / "pc.jsonl", [PROMPT_COMPLETION, long_prompt])
    report = validate_file(path, tokenizer, max_seq_len=20)
    assert report["truncated"] == 1 and report["dropped"] == 1
    assert report["longest"] > 20 and report["tokens"] == len(tok_line(tokenizer, PROMPT_COMPLETION, "prompt_completion")["input_ids"]) + 20
    loaded = load_tokenized(path, tokenizer, 20)
    assert len(loaded.examples) == 1 and loaded.dropped == 1
    with pytest.raises(DataError, match="max_seq_len"):
        load_tokenized(write_jsonl(tmp_path / "all_long.jsonl", [long_prompt]), tokenizer, 20)


def test_an_oversized_line_is_refused_without_reading_it_whole(tmp_path: Path, monkeypatch):
    monkeypatch.setattr("trainer.data.parse.MAX_LINE_BYTES", 1000)
    path = write_jsonl(tmp_path / "big_line.jsonl", [TEXT, {"text": "x" * 5000}, TEXT])
    report = validate_file(path)
    assert [(e["line"], e["code"]) for e in report["errors"]] == [(2, "line_too_long")]
    assert report["examples"] == 2 and report["lines"] == 3


@pytest.mark.slow
def test_a_large_file_is_validated_in_bounded_memory(tmp_path: Path):
    path = tmp_path / "large.jsonl"
    good = json.dumps({"messages": [
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "question " * 30},
        {"role": "assistant", "content": "answer " * 40},
    ]}) + "\n"
    bad = '{"messages": [}\n'
    every = 200  # one bad line in each block of this many, so the errors outnumber the report's cap of 100
    size = 0
    with open(path, "w") as f:
        while size < 16 * 1024 * 1024:
            for _ in range(every - 1):
                f.write(good)
            f.write(bad)
            size += (every - 1) * len(good) + len(bad)
    tracemalloc.start()
    t = time.perf_counter()
    try:
        report = validate_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - t
    lines = size // ((every - 1) * len(good) + len(bad)) * every
    print(f"validated {size / 1e6:.0f} MB, {lines} lines in {elapsed:.1f}s, peak traced memory {peak / 1e6:.2f} MB")
    assert report["lines"] == lines and report["examples"] == lines - lines // every
    assert report["error_counts"] == {"invalid_json": lines // every} and len(report["errors"]) == 100
    # A quarter of the file: streaming holds well under a megabyte, a read of the whole file holds all of it.
    assert peak < size // 4, f"validation held {peak} bytes of a {size}-byte file: it was not streamed"
    assert elapsed < 120
