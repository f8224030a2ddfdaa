"""Chat lines as OpenAI sends them: tools, tool calls, tool and developer turns.

They render through the model's chat template (tools passed as tools=...), the loss covers what
the assistant wrote (its tool calls included) and nothing else, and bad lines are reported by
line number without a tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.conftest import write_jsonl
from tests.unit.test_trainer_data import trained_text
from trainer.data.parse import LineError, parse_example
from trainer.data.tokenize import tokenize_messages
from trainer.data.validate import validate_file

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}
TOOL_LINE = {
    "tools": [WEATHER],
    "messages": [
        {"role": "developer", "content": "Answer with the tool's figures."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
        {"role": "assistant", "content": "Paris has 18 C and sun."},
    ],
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_tool_calls_and_answers_are_trained_and_nothing_else(tokenizer) -> None:
    ex = tokenize_messages(tokenizer, parse_example(TOOL_LINE))
    text = tokenizer.decode(ex["input_ids"])
    # Everything reached the model: the tool definition, the developer turn, the call, the result.
    for seen in ('"name": "get_weather"', "The weather in a city.", "Answer with the tool", "18 C and sunny"):
        assert seen in text
    eos = tokenizer.eos_token
    assert trained_text(tokenizer, ex) == [
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' + eos,
        "Paris has 18 C and sun." + eos,
    ]


def test_a_weight_0_tool_call_is_context(tokenizer) -> None:
    line = json.loads(json.dumps(TOOL_LINE))
    line["messages"][2]["weight"] = 0
    assert trained_text(tokenizer, tokenize_messages(tokenizer, parse_example(line))) == [
        "Paris has 18 C and sun." + tokenizer.eos_token]


def test_the_fallback_template_renders_tools_too(tokenizer, monkeypatch) -> None:
    monkeypatch.setattr(tokenizer, "chat_template", None)
    ex = tokenize_messages(tokenizer, parse_example(TOOL_LINE))
    text = tokenizer.decode(ex["input_ids"])
    assert "### Tools:" in text and "### Tool:\n18 C and sunny" in text and "### System:\nAnswer" in text
    assert trained_text(tokenizer, ex)[0].startswith('<tool_call>{"name": "get_weather"')


def test_a_template_that_drops_tools_is_refused_not_trained_on_empty_turns(tokenizer, monkeypatch) -> None:
    # A template from before tools: it renders role and content only, so calls would vanish.
    monkeypatch.setattr(tokenizer, "chat_template", "{% for m in messages %}{{ m['role'] + ': ' + (m['content'] or '') + '\n' }}"
                                                    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(LineError, match="does not render the line's tools") as info:
        tokenize_messages(tokenizer, parse_example(TOOL_LINE))
    assert info.value.code == "template_error"
    no_tools = {"messages": [m for m in TOOL_LINE["messages"]]}
    with pytest.raises(LineError, match="does not render tool calls"):
        tokenize_messages(tokenizer, parse_example(no_tools))


def test_bad_tool_lines_are_reported_by_line_number(tmp_path: Path) -> None:
    def with_messages(*changes: dict) -> dict:
        line = json.loads(json.dumps(TOOL_LINE))
        for change in changes:
            for k, v in change.items():
                i, key = k
                line["messages"][i][key] = v
        return line

    bad_args = with_messages({(2, "tool_calls"): [{**CALL, "function": {"name": "get_weather", "arguments": "{city"}}]})
    unknown_fn = with_messages({(2, "tool_calls"): [{**CALL, "function": {"name": "get_time", "arguments": "{}"}}]})
    stray_tool = {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"},
                               {"role": "assistant", "content": "ok"}]}
    wrong_id = with_messages({(3, "tool_call_id"): "call_9"})
    user_calls = with_messages({(1, "tool_calls"): [CALL]})
    path = write_jsonl(tmp_path / "tools.jsonl", [
        TOOL_LINE,  # 1
        {**TOOL_LINE, "tools": {"name": "x"}},  # 2
        {**TOOL_LINE, "tools": [{"type": "function", "function": {"name": "bad name"}}]},  # 3
        bad_args,  # 4
        unknown_fn,  # 5
        stray_tool,  # 6
        wrong_id,  # 7
        user_calls,  # 8
        with_messages({(2, "tool_calls"): None}),  # 9: an assistant turn with neither content nor calls
        {"messages": [{"role": "function", "content": "x"}, {"role": "assistant", "content": "y"}]},  # 10
        {"messages": TOOL_LINE["messages"]},  # 11: tools are optional
    ])
    report = validate_file(path)
    assert [(e["line"], e["code"]) for e in report["errors"]] == [
        (2, "invalid_tools"), (3, "invalid_tools"), (4, "invalid_tool_call"), (5, "invalid_tool_call"),
        (6, "invalid_tool_message"), (7, "invalid_tool_message"), (8, "invalid_tool_call"), (9, "empty_content"),
        (10, "invalid_role"),
    ], report["errors"]
    assert report["examples"] == 2
    messages = {e["line"]: e["message"] for e in report["errors"]}
    assert "messages[2].tool_calls[0].function.arguments is not valid JSON" in messages[4]
    assert "'get_time' is not among the line's tools" in messages[5]
    assert "allowed: system, developer, user, assistant, tool" in messages[10]


def test_a_tool_file_counts_tokens_with_the_tokenizer(tmp_path: Path, tokenizer) -> None:
    report = validate_file(write_jsonl(tmp_path / "ok.jsonl", [TOOL_LINE] * 3), tokenizer, max_seq_len=512)
    assert report["valid"], report["errors"]
    one = tokenize_messages(tokenizer, parse_example(TOOL_LINE))
    assert report["trained_tokens"] == 3 * sum(1 for x in one["labels"] if x != -100)
