"""Training files: JSONL lines, their formats, and the checks each line must pass.

One JSONL line is one example, in one of four formats (one format per file):

- chat: {"messages": [{"role": "system"|"developer"|"user"|"assistant"|"tool", "content": "...",
  "weight": 0|1}], "tools": [...]}, as OpenAI's chat fine-tuning takes it: assistant turns may
  carry `tool_calls` (then content may be empty), `tool` turns answer them (`tool_call_id`), and
  the line's `tools` are the function definitions the model was shown. The model learns what the
  assistant says, its tool calls included (weight 0 turns are context).
- alpaca: {"instruction": "...", "input": "..." (optional), "output": "..."}; rendered as a
  user turn and an assistant turn through the chat template, so the model is trained in the
  format it will be prompted with.
- prompt_completion: {"prompt": "...", "completion": "..."}; the plain concatenation, as in
  OpenAI's legacy format; the completion is learned.
- text: {"text": "..."}; continued pretraining, every token is learned, and a document longer
  than max_seq_len is split into windows rather than cut.
- preference: OpenAI's DPO lines, {"input": {"messages": [...]}, "preferred_output": [assistant
  message], "non_preferred_output": [assistant message]}; the preference objectives (dpo, simpo,
  orpo) score both outputs after the same input.

One more format is not trained on but asked: eval files (a job's `eval.file`) hold
{"messages": [... ending with a user turn], "expected": "the answer"}; the model answers the
messages and graders compare its answer with `expected` (trainer.graders). A line with
`expected` is an eval line; a training file of them is refused.

Every trained span ends with EOS so a trained model stops. `train_on_inputs` also trains the
prompt side (default: false, except raw text where everything is the target).

Nothing here needs torch or a tokenizer: the API validates an upload with this module alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")
FORMATS = ("chat", "alpaca", "prompt_completion", "text", "preference")
EVAL_FORMAT = "eval"
# A line longer than this is refused without being held in memory whole: no single example
# a model could train on comes near it, and an upload must not be a way to exhaust the API.
MAX_LINE_BYTES = 32 * 1024 * 1024


@dataclass(slots=True)
class Message:
    role: str
    content: str
    weight: int = 1  # only meaningful for assistant turns
    # An assistant turn's calls, as chat templates take them: {"id", "type": "function",
    # "function": {"name", "arguments": {...}}} (OpenAI's JSON string of arguments decoded).
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None  # a tool turn: the call it answers


class Chat(list):
    """A chat example: its messages (a list of Message) and the line's tool definitions, if any."""

    def __init__(self, messages: list[Message], tools: list[dict] | None = None) -> None:
        super().__init__(messages)
        self.tools = tools


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for messages about a user's line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


class LineError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _content_text(content: Any, where: str) -> str:
    # OpenAI also allows a list of typed parts; text parts are all a text model can use.
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise LineError("unsupported_content", f"{where}.content: only text parts are supported")
            parts.append(part["text"])
        text = "".join(parts)
    elif content is None:
        raise LineError("empty_content", f"{where}.content is missing")
    else:
        raise LineError("empty_content", f"{where}.content must be a string, not {json_type(content)}")
    if not text.strip():
        raise LineError("empty_content", f"{where}.content is empty")
    return text


def parse_example(obj: Any) -> Chat:
    """The messages of one decoded JSON line, or LineError naming the first problem."""
    messages = _messages(obj)
    assistants = [m for m in messages if m.role == "assistant"]
    if not assistants:
        raise LineError("no_assistant", "no assistant message: there is nothing to learn from this example")
    if not any(m.weight for m in assistants):
        raise LineError("no_assistant", "every assistant message has weight 0: nothing to learn")
    return messages


def _messages(obj: Any) -> Chat:
    if not isinstance(obj, dict):
        raise LineError("not_object", f"line must be a JSON object, not {json_type(obj)}")
    if "messages" not in obj:
        keys = ", ".join(sorted(obj)[:5]) or "none"
        raise LineError("missing_messages", f"'messages' is missing (keys: {keys}); the chat format is required")
    raw = obj["messages"]
    if not isinstance(raw, list) or not raw:
        raise LineError("missing_messages", "'messages' must be a non-empty list")
    # The common line has no tool fields: checked by key first, it pays for no calls.
    tools = _tools(obj["tools"]) if "tools" in obj else None
    known = {t["function"]["name"] for t in tools} if tools else None
    messages: list[Message] = []
    call_ids: set[str] = set()
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise LineError("invalid_message", f"{where} must be an object")
        role = m.get("role")
        if role not in ROLES:
            raise LineError("invalid_role", f"{where}.role is {role!r}; allowed: {', '.join(ROLES)}")
        calls = None
        if "tool_calls" in m:
            if role != "assistant" and m["tool_calls"] is not None:
                raise LineError("invalid_tool_call", f"{where}.tool_calls: only assistant messages make tool calls")
            calls = _tool_calls(m, where, known)
        # An assistant turn that only calls tools says nothing else.
        text = "" if calls and not m.get("content") else _content_text(m.get("content"), where)
        weight = m.get("weight", 1)
        if "weight" in m:
            if role != "assistant":
                raise LineError("invalid_weight", f"{where}.weight: only assistant messages take a weight")
            if isinstance(weight, bool) or weight not in (0, 1):
                raise LineError("invalid_weight", f"{where}.weight is {weight!r}; allowed: 0 or 1")
        call_id = _answered_call(m, where, messages, call_ids) if role == "tool" else None
        if calls:
            call_ids.update(c["id"] for c in calls if "id" in c)
        messages.append(Message(role, text, int(weight), calls, call_id))
    return Chat(messages, tools)


def _is_name(value: Any) -> bool:
    # OpenAI's rule for function names.
    return (isinstance(value, str) and 0 < len(value) <= 64
            and all(c.isascii() and (c.isalnum() or c in "_-") for c in value))


def _tools(raw: Any) -> list[dict] | None:
    """The line's `tools`: function definitions, as OpenAI's API takes them."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise LineError("invalid_tools", f"'tools' must be a list, not {json_type(raw)}")
    tools, names = [], set()
    for k, tool in enumerate(raw):
        where = f"tools[{k}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise LineError("invalid_tools", f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}")
        fn = tool["function"]
        if not _is_name(fn.get("name")):
            raise LineError("invalid_tools", f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-', "
                                             f"got {fn.get('name')!r}")
        if fn["name"] in names:
            raise LineError("invalid_tools", f"{where}.function.name {fn['name']!r} is defined twice")
        names.add(fn["name"])
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise LineError("invalid_tools", f"{where}.function.parameters must be a JSON schema object")
        if "description" in fn and not isinstance(fn["description"], str):
            raise LineError("invalid_tools", f"{where}.function.description must be a string")
        tools.append({"type": "function", "function": fn})
    return tools or None


def _tool_calls(m: dict, where: str, known: set[str] | None) -> list[dict] | None:
    """An assistant message's tool_calls, their arguments decoded for the chat template."""
    raw = m.get("tool_calls")
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw:
        raise LineError("invalid_tool_call", f"{where}.tool_calls must be a non-empty list")
    calls = []
    for k, call in enumerate(raw):
        at = f"{where}.tool_calls[{k}]"
        if not isinstance(call, dict) or call.get("type", "function") != "function" \
                or not isinstance(call.get("function"), dict):
            raise LineError("invalid_tool_call", f"{at} must be {{\"type\": \"function\", \"function\": {{...}}}}")
        fn = call["function"]
        name = fn.get("name")
        if not _is_name(name):
            raise LineError("invalid_tool_call", f"{at}.function.name must be 1 to 64 letters, digits, '_' or '-', "
                                                 f"got {name!r}")
        if known is not None and name not in known:
            raise LineError("invalid_tool_call", f"{at}.function.name {name!r} is not among the line's tools")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except (json.JSONDecodeError, RecursionError):
                raise LineError("invalid_tool_call", f"{at}.function.arguments is not valid JSON") from None
        if not isinstance(args, dict):
            raise LineError("invalid_tool_call", f"{at}.function.arguments must be a JSON object")
        if "id" in call and not (isinstance(call["id"], str) and call["id"]):
            raise LineError("invalid_tool_call", f"{at}.id must be a non-empty string")
        out = {"type": "function", "function": {"name": name, "arguments": args}}
        if call.get("id"):
            out["id"] = call["id"]
        calls.append(out)
    return calls


def _answered_call(m: dict, where: str, before: list[Message], call_ids: set[str]) -> str | None:
    """A tool message answers a call of an earlier assistant turn, named by tool_call_id when given."""
    if not any(p.tool_calls for p in before if p.role == "assistant"):
        raise LineError("invalid_tool_message", f"{where}: a tool message must follow an assistant turn with tool_calls")
    call_id = m.get("tool_call_id")
    if call_id is None:
        return None
    if not isinstance(call_id, str) or call_id not in call_ids:
        raise LineError("invalid_tool_message", f"{where}.tool_call_id {call_id!r} names no earlier tool call")
    return call_id


@dataclass
class EvalItem:
    """One line of an eval file: the conversation the model answers, and the answer expected."""

    messages: list[Message]
    expected: str


def parse_eval(obj: Any) -> EvalItem:
    """One decoded line of an eval file, or LineError naming the first problem."""
    messages = _messages(obj)
    if messages[-1].role != "user":
        raise LineError("invalid_message", f"messages[{len(messages) - 1}].role is {messages[-1].role!r}; an eval "
                        "line ends with the user turn the model answers")
    expected = obj.get("expected")
    if not isinstance(expected, str):
        raise LineError("invalid_type", f"'expected' must be a string, not {json_type(expected)}")
    if not expected.strip():
        raise LineError("empty_content", "'expected' is empty")
    return EvalItem(messages, expected)


@dataclass
class RawText:
    """A non-chat example: text pieces in order, each trained or context."""

    pieces: list[tuple[str, bool]]


@dataclass
class Preference:
    """A preference pair: the input conversation, and the output preferred after it over the other."""

    prompt: Chat  # its messages, and the input's tools
    preferred: list[Message]
    non_preferred: list[Message]


Record = Chat | RawText | Preference | EvalItem
PREFERENCE_KEYS = ("input", "preferred_output", "non_preferred_output")


def _preference_output(obj: dict, key: str) -> list[Message]:
    raw = obj.get(key)
    if raw is None:
        raise LineError("missing_field", f"'{key}' is missing; a preference line needs 'input', "
                        "'preferred_output' and 'non_preferred_output'")
    if not isinstance(raw, list) or not raw:
        raise LineError("invalid_type", f"'{key}' must be a non-empty list of assistant messages")
    out = []
    for i, m in enumerate(raw):
        where = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise LineError("invalid_message", f"{where} must be an object")
        if m.get("role") != "assistant":
            raise LineError("invalid_role", f"{where}.role is {m.get('role')!r}; an output is an assistant message")
        out.append(Message("assistant", _content_text(m.get("content"), where)))
    return out


def parse_preference(obj: dict) -> Preference:
    """One preference line, or LineError naming the first problem."""
    for key in obj:
        if key not in PREFERENCE_KEYS:
            raise LineError("unknown_field", f"'{key}': not a field of a preference line (allowed: "
                            f"{', '.join(PREFERENCE_KEYS)})")
    given = obj.get("input")
    if not isinstance(given, dict) or "messages" not in given:
        raise LineError("missing_messages", "'input' must be an object with 'messages' (the conversation so far)")
    if not isinstance(given["messages"], list) or not given["messages"]:
        raise LineError("missing_messages", "'input.messages' must be a non-empty list")
    # The input is checked as a chat conversation that the output would end; its assistant turns
    # are context (weight 0): only the outputs are scored.
    try:
        chat = parse_example({"messages": [*given["messages"], {"role": "assistant", "content": "-"}],
                              **({"tools": given["tools"]} if "tools" in given else {})})
        prompt = Chat(chat[:-1], chat.tools)
    except LineError as err:
        raise LineError(err.code, f"input.{err.message}") from None
    for m in prompt:
        m.weight = 0
    preferred = _preference_output(obj, "preferred_output")
    non_preferred = _preference_output(obj, "non_preferred_output")
    return Preference(prompt, preferred, non_preferred)


def detect_format(obj: Any) -> str | None:
    """The format a decoded line looks like, by its keys; None when it looks like none."""
    if not isinstance(obj, dict):
        return None
    if "expected" in obj:
        return EVAL_FORMAT
    if any(k in obj for k in PREFERENCE_KEYS[1:]) or ("input" in obj and isinstance(obj["input"], dict)):
        return "preference"
    if "messages" in obj:
        return "chat"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    if "prompt" in obj or "completion" in obj:
        return "prompt_completion"
    if "text" in obj:
        return "text"
    return None


FORMAT_KEYS = {
    "chat": "'messages'", "alpaca": "'instruction' and 'output'",
    "prompt_completion": "'prompt' and 'completion'", "text": "'text'",
    "preference": "'input', 'preferred_output' and 'non_preferred_output'", EVAL_FORMAT: "'messages' and 'expected'",
}


def _string(obj: dict, key: str, required: bool = True, may_be_empty: bool = False) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise LineError("missing_field", f"'{key}' is missing")
        return ""
    if not isinstance(value, str):
        raise LineError("invalid_type", f"'{key}' must be a string, not {json_type(value)}")
    if not may_be_empty and not value.strip():
        raise LineError("empty_content", f"'{key}' is empty")
    return value


def parse_record(obj: Any, fmt: str) -> Record:
    """One decoded line of a file in format `fmt`, or LineError naming the first problem."""
    if not isinstance(obj, dict):
        raise LineError("not_object", f"line must be a JSON object, not {json_type(obj)}")
    seen = detect_format(obj)
    if seen is None:
        keys = ", ".join(sorted(obj)[:5]) or "none"
        if fmt == "chat":
            raise LineError("missing_messages", f"'messages' is missing (keys: {keys}); the chat format is required")
        raise LineError("unknown_format", f"no {FORMAT_KEYS[fmt]} (keys: {keys}); this is a {fmt} file")
    if seen != fmt:
        if fmt == "chat":
            raise LineError("missing_messages", f"'messages' is missing; this line is {seen} but the file is chat")
        raise LineError("wrong_format", f"this line is {seen} ({FORMAT_KEYS[seen]}) but the file is {fmt}")
    if fmt == "chat":
        return parse_example(obj)
    if fmt == EVAL_FORMAT:
        return parse_eval(obj)
    if fmt == "preference":
        return parse_preference(obj)
    if fmt == "alpaca":
        instruction = _string(obj, "instruction")
        extra = _string(obj, "input", required=False, may_be_empty=True)
        output = _string(obj, "output")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Chat([Message("user", prompt), Message("assistant", output)])
    if fmt == "prompt_completion":
        # An empty prompt is legal: unconditional generation of the completion.
        return RawText([(_string(obj, "prompt", may_be_empty=True), False), (_string(obj, "completion"), True)])
    return RawText([(_string(obj, "text"), True)])


def _read_lines(path: str | Path) -> Iterator[tuple[int, bytes | LineError]]:
    # readline with a limit keeps one oversized line from being read into memory whole.
    with open(path, "rb") as f:
        number = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            number += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):
                    raw = f.readline(MAX_LINE_BYTES)
                yield number, LineError("line_too_long", f"line is longer than {MAX_LINE_BYTES} bytes")
                continue
            yield number, raw


def iter_lines(path: str | Path, counter: list[int] | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, decoded JSON or LineError) for every non-blank line, one line in memory.

    `counter[0]` is left at the number of lines read, blank ones included.
    """
    for number, raw in _read_lines(path):
        if counter is not None:
            counter[0] = number
        if isinstance(raw, LineError):
            yield number, raw
            continue
        if not raw.strip():
            continue
        if number == 1:
            # Windows editors start UTF-8 files with a byte order mark; it is no part of the JSON.
            raw = raw.removeprefix(b"\xef\xbb\xbf")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield number, LineError("invalid_utf8", f"not UTF-8 at byte {exc.start}")
            continue
        try:
            obj = json.loads(text)
            # A \u escape can name half of a UTF-16 pair alone, which no text holds: tokenizers
            # refuse such a string, so it is refused here, with the line, rather than at training.
            if "\\u" in text and _has_lone_surrogate(obj):
                yield number, LineError("invalid_utf8", "a \\u escape names a lone UTF-16 surrogate, which is not text")
                continue
            yield number, obj
        except json.JSONDecodeError as exc:
            yield number, LineError("invalid_json", f"invalid JSON: {exc.msg} at column {exc.colno}")
        except RecursionError:
            # The decoder recurses once per level: a hostile line must not take the process down.
            yield number, LineError("invalid_json", "invalid JSON: nested too deeply")


def _has_lone_surrogate(obj: Any) -> bool:
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def iter_records(
    path: str | Path, data_format: str = "auto", counter: list[int] | None = None
) -> Iterator[tuple[int, str | None, Record | LineError]]:
    """(line number, the file's format, parsed example or LineError) for every non-blank line.

    With data_format auto, the first line that looks like a format fixes it for the file; until
    then the format is None (only a LineError comes with it).
    """
    fmt = None if data_format == "auto" else data_format
    for number, obj in iter_lines(path, counter):
        if isinstance(obj, LineError):
            yield number, fmt, obj
            continue
        if fmt is None:
            fmt = detect_format(obj)
            if fmt is None:
                if not isinstance(obj, dict):
                    yield number, None, LineError("not_object", f"line must be a JSON object, not {json_type(obj)}")
                    continue
                keys = ", ".join(sorted(obj)[:5]) or "none"
                yield number, None, LineError(
                    "unknown_format",
                    f"not an example of any format (keys: {keys}); "
                    "expected 'messages', 'instruction'/'output', 'prompt'/'completion', 'text' or "
                    "'input'/'preferred_output'/'non_preferred_output'",
                )
                continue
        try:
            yield number, fmt, parse_record(obj, fmt)
        except LineError as err:
            yield number, fmt, err


def trains_inputs(fmt: str, train_on_inputs: bool | None) -> bool:
    return fmt == "text" if train_on_inputs is None else train_on_inputs
