"""Chat data: validation report, loss masks from the chat template, truncation, collation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.conftest import write_jsonl
from trainer.data.batch import collate
from trainer.data.parse import LineError, parse_example
from trainer.data.tokenize import IGNORE_INDEX, tokenize_messages
from trainer.data.validate import validate_file

CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris.", "weight": 0},
        {"role": "user", "content": "And of Spain?"},
        {"role": "assistant", "content": "Madrid."},
    ]
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def trained_text(tokenizer, example: dict) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs, current = [], []
    for tid, label in zip(example["input_ids"], example["labels"], strict=True):
        if label == IGNORE_INDEX:
            if current:
                runs.append(tokenizer.decode(current))
            current = []
        else:
            assert label == tid
            current.append(tid)
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_only_weighted_assistant_turns_and_eos_are_trained(tokenizer):
    ex = tokenize_messages(tokenizer, parse_example(CONVERSATION))
    assert trained_text(tokenizer, ex) == ["Madrid." + tokenizer.eos_token]
    assert ex["input_ids"][0] == tokenizer.bos_token_id


def test_every_assistant_turn_is_trained_without_weights(tokenizer):
    conv = json.loads(json.dumps(CONVERSATION))
    del conv["messages"][2]["weight"]
    ex = tokenize_messages(tokenizer, parse_example(conv))
    eos = tokenizer.eos_token
    assert trained_text(tokenizer, ex) == ["Paris." + eos, "Madrid." + eos]


def test_masks_follow_any_template(tokenizer):
    # A ChatML-style template whose markers are not tokens of this vocabulary: the spans come
    # from the rendered text, so they are still exact.
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    ex = tokenize_messages(tok, parse_example(CONVERSATION))
    assert trained_text(tok, ex) == ["Madrid.<|im_end|>"]


def test_fallback_template_when_tokenizer_has_none(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = None
    ex = tokenize_messages(tok, parse_example(CONVERSATION))
    text = tok.decode(ex["input_ids"])
    assert "### User:\nAnd of Spain?" in text
    assert trained_text(tok, ex) == ["Madrid." + tok.eos_token]


def test_truncation_keeps_the_head(tokenizer):
    full = tokenize_messages(tokenizer, parse_example(CONVERSATION))
    cut = tokenize_messages(tokenizer, parse_example(CONVERSATION), max_seq_len=10)
    assert cut["truncated"] == 1 and full["truncated"] == 0
    assert cut["input_ids"] == full["input_ids"][:10]
    assert cut["labels"] == full["labels"][:10]


def test_collate_pads_right_with_masks():
    batch = collate(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_validate_file_reports_each_kind_of_bad_line(tmp_path: Path, tokenizer):
    good = CONVERSATION
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            good,  # 1
            '{"messages": [',  # 2 invalid_json
            "[1, 2]",  # 3 not_object
            {"prompt": "hi", "completion": "there"},  # 4 missing_messages
            {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},  # 5
            {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]},  # 6
            {"messages": [{"role": "user", "content": "hi"}]},  # 7 no_assistant
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y", "weight": 2}]},
            "",  # 9 blank lines are skipped
            good,  # 10
        ],
    )
    report = validate_file(path)
    assert report["valid"] is False
    assert report["format"] == "chat"
    assert report["lines"] == 10
    assert report["examples"] == 2
    assert [(e["line"], e["code"]) for e in report["errors"]] == [
        (2, "invalid_json"),
        (3, "not_object"),
        (4, "missing_messages"),
        (5, "invalid_role"),
        (6, "empty_content"),
        (7, "no_assistant"),
        (8, "invalid_weight"),
    ]
    assert report["error_counts"] == {
        "invalid_json": 1, "not_object": 1, "missing_messages": 1, "invalid_role": 1,
        "empty_content": 1, "no_assistant": 1, "invalid_weight": 1,
    }
    assert all(e["message"] for e in report["errors"])
    assert report["tokens"] is None and report["truncated"] is None

    with_tokens = validate_file(path, tokenizer, max_seq_len=12)
    assert with_tokens["tokens"] == 2 * 12
    assert with_tokens["truncated"] == 2


def test_validate_file_counts_all_but_lists_first_hundred(tmp_path: Path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["not json"] * 150 + [CONVERSATION])
    report = validate_file(path)
    assert len(report["errors"]) == 100
    assert report["error_counts"] == {"invalid_json": 150}
    assert report["examples"] == 1


def test_valid_file_and_token_count(tmp_path: Path, tokenizer):
    path = write_jsonl(tmp_path / "ok.jsonl", [CONVERSATION] * 3)
    report = validate_file(path, tokenizer)
    one = len(tokenize_messages(tokenizer, parse_example(CONVERSATION))["input_ids"])
    assert report["valid"] and report["errors"] == [] and report["error_counts"] == {}
    assert report["tokens"] == 3 * one and report["truncated"] == 0


def test_empty_and_missing_files(tmp_path: Path):
    assert validate_file(write_jsonl(tmp_path / "empty.jsonl", []))["error_counts"] == {"empty_file": 1}
    assert validate_file(tmp_path / "nope.jsonl")["error_counts"] == {"file_not_found": 1}


def test_all_weight_zero_is_refused():
    with pytest.raises(LineError) as info:
        parse_example({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]})
    assert info.value.code == "no_assistant"


def test_tokenizers_without_offsets_get_the_same_masks(tokenizer):
    expected = tokenize_messages(tokenizer, parse_example(CONVERSATION))

    class NoOffsets:
        """A python (slow) tokenizer: no offsets mapping."""

        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, text, **kwargs):
            if kwargs.get("return_offsets_mapping"):
                raise NotImplementedError("return_offsets_mapping is not available for python tokenizers")
            return tokenizer(text, **kwargs)

    assert tokenize_messages(NoOffsets(), parse_example(CONVERSATION)) == expected


def test_a_byte_order_mark_before_the_first_line_is_not_part_of_it(tmp_path: Path, tokenizer):
    # Windows editors write UTF-8 with a BOM; the line after it is the same example.
    path = write_jsonl(tmp_path / "bom.jsonl", [CONVERSATION] * 2)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    report = validate_file(path, tokenizer)
    assert report["valid"] and report["examples"] == 2, report
    assert report["tokens"] == validate_file(write_jsonl(tmp_path / "plain.jsonl", [CONVERSATION] * 2), tokenizer)["tokens"]
    # Only at the start of the file: elsewhere it is a broken line.
    path.write_bytes(path.read_bytes() + b"\xef\xbb\xbf" + json.dumps(CONVERSATION).encode() + b"\n")
    assert validate_file(path)["error_counts"] == {"invalid_json": 1}


@pytest.mark.parametrize(("line", "named"), [("null", "null"), ("[1, 2]", "array"), ('"text"', "string"),
                                              ("3", "number"), ("true", "boolean")])
def test_a_line_that_is_no_object_is_named_in_jsons_words(tmp_path: Path, line: str, named: str):
    # First line (the format is not known yet) and a later line of a chat file: the same words.
    path = tmp_path / "lines.jsonl"
    path.write_text(f"{line}\n{json.dumps(CONVERSATION)}\n{line}\n")
    errors = validate_file(path)["errors"]
    assert [(e["line"], e["code"]) for e in errors] == [(1, "not_object"), (3, "not_object")]
    assert all(e["message"] == f"line must be a JSON object, not {named}" for e in errors), errors
