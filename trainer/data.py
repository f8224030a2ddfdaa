"""Chat JSONL: validation, tokenisation with loss masks, and batching.

A line is an OpenAI chat example: {"messages": [{"role": "system"|"user"|"assistant",
"content": "...", "weight": 0|1 (assistant only, optional)}]}. The model learns only what the
assistant says: system and user turns, and assistant turns with weight 0, are context.

Masks come from the tokenizer's own chat template, not from guessing its markers: each
assistant turn's text span is found by rendering the conversation up to the turn (with the
generation prompt) and up to its end, and every token overlapping that span is trained. This
works for any template and tokenizer, including BPE merges across turn boundaries.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.errors import DataError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
MAX_REPORTED_ERRORS = 100

# For tokenizers without a chat template (base models). Plain-text role markers; EOS after each
# assistant turn so the model learns to stop.
FALLBACK_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '### ' + message['role'] | capitalize + ':\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}"
    "{{ '\n\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


# ---------------------------------------------------------------------------------------------
# Parsing and validation


@dataclass
class Message:
    role: str
    content: str
    weight: int = 1  # only meaningful for assistant turns


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
        raise LineError("empty_content", f"{where}.content must be a string, not {type(content).__name__}")
    if not text.strip():
        raise LineError("empty_content", f"{where}.content is empty")
    return text


def parse_example(obj: Any) -> list[Message]:
    """The messages of one decoded JSON line, or LineError naming the first problem."""
    if not isinstance(obj, dict):
        raise LineError("not_object", f"line must be a JSON object, not {type(obj).__name__}")
    if "messages" not in obj:
        keys = ", ".join(sorted(obj)[:5]) or "none"
        raise LineError("missing_messages", f"'messages' is missing (keys: {keys}); the chat format is required")
    raw = obj["messages"]
    if not isinstance(raw, list) or not raw:
        raise LineError("missing_messages", "'messages' must be a non-empty list")
    messages = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise LineError("invalid_message", f"{where} must be an object")
        role = m.get("role")
        if role not in ROLES:
            raise LineError("invalid_role", f"{where}.role is {role!r}; allowed: system, user, assistant")
        text = _content_text(m.get("content"), where)
        weight = m.get("weight", 1)
        if "weight" in m:
            if role != "assistant":
                raise LineError("invalid_weight", f"{where}.weight: only assistant messages take a weight")
            if isinstance(weight, bool) or weight not in (0, 1):
                raise LineError("invalid_weight", f"{where}.weight is {weight!r}; allowed: 0 or 1")
        messages.append(Message(role, text, int(weight)))
    assistants = [m for m in messages if m.role == "assistant"]
    if not assistants:
        raise LineError("no_assistant", "no assistant message: there is nothing to learn from this example")
    if not any(m.weight for m in assistants):
        raise LineError("no_assistant", "every assistant message has weight 0: nothing to learn")
    return messages


def iter_lines(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, decoded JSON or LineError) for every non-blank line, one line in memory."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, LineError("invalid_utf8", f"not UTF-8 at byte {exc.start}")
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as exc:
                yield number, LineError("invalid_json", f"invalid JSON: {exc.msg} at column {exc.colno}")


def validate_file(path: str | Path, tokenizer: Any = None, max_seq_len: int | None = None) -> dict:
    """The validation report of docs/internals.md; streams the file, so any size fits in memory."""
    errors: list[dict] = []
    counts: Counter[str] = Counter()
    lines = examples = tokens = truncated = 0

    def fail(line: int, err: LineError) -> None:
        counts[err.code] += 1
        if len(errors) < MAX_REPORTED_ERRORS:
            errors.append({"line": line, "code": err.code, "message": err.message})

    p = Path(path)
    if not p.is_file():
        fail(0, LineError("file_not_found", f"{path} is not a readable file"))
    else:
        with open(p, "rb") as f:
            lines = sum(1 for _ in f)
        for number, obj in iter_lines(p):
            if isinstance(obj, LineError):
                fail(number, obj)
                continue
            try:
                messages = parse_example(obj)
                if tokenizer is not None:
                    ex = tokenize_messages(tokenizer, messages, max_seq_len)
                    tokens += len(ex["input_ids"])
                    truncated += ex["truncated"]
            except LineError as err:
                fail(number, err)
                continue
            examples += 1
        if examples == 0 and not counts:
            fail(0, LineError("empty_file", "the file has no examples"))
    return {
        "valid": not counts,
        "format": "chat",
        "lines": lines,
        "examples": examples,
        "errors": errors,
        "error_counts": dict(counts),
        "tokens": tokens if tokenizer is not None else None,
        "truncated": truncated if tokenizer is not None else None,
    }


# ---------------------------------------------------------------------------------------------
# Tokenisation


def _render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> str:
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def assistant_spans(tokenizer: Any, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its trained assistant turns.

    A span starts where the generation prompt ends and stops at the end of the turn (EOS
    included), without the template's trailing whitespace, which the model never has to emit.
    Common prefixes rather than exact prefix checks keep this right for templates that rewrite
    earlier turns (e.g. drop reasoning from past assistant messages).
    """
    plain = [{"role": m.role, "content": m.content} for m in messages]
    try:
        full = _render(tokenizer, plain, add_generation_prompt=False)
        spans = []
        for i, m in enumerate(messages):
            if m.role != "assistant" or not m.weight:
                continue
            try:
                head = _render(tokenizer, plain[:i], add_generation_prompt=True) if i else ""
            except Exception:  # noqa: BLE001 - some templates refuse a conversation without a user turn
                head = ""
            start = _common_prefix(head, full)
            end = _common_prefix(_render(tokenizer, plain[: i + 1], add_generation_prompt=False), full)
            while end > start and full[end - 1].isspace():
                end -= 1
            if end > start:
                spans.append((start, end))
    except Exception as exc:  # noqa: BLE001 - jinja raise_exception and template bugs alike
        raise LineError("template_error", f"the chat template rejected this conversation: {exc}") from exc
    return full, spans


def _labels_by_offsets(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = []
    k = 0
    for tid, (s, e) in zip(ids, enc["offset_mapping"], strict=True):
        while k < len(spans) and spans[k][1] <= s:
            k += 1
        trained = k < len(spans) and s < spans[k][1] and e > spans[k][0]
        labels.append(tid if trained else IGNORE_INDEX)
    return ids, labels


def _labels_by_prefix_ids(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    # Tokenizers without offsets: a span's tokens are those that differ between the token ids
    # of the text up to the span's start and up to its end.
    def ids_of(s: str) -> list[int]:
        return list(tokenizer(s, add_special_tokens=False)["input_ids"])

    ids = ids_of(text)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        a = ids_of(text[:start])
        b = ids_of(text[:end])
        lo = next((i for i, (x, y) in enumerate(zip(a, ids, strict=False)) if x != y), min(len(a), len(ids)))
        hi = next((i for i, (x, y) in enumerate(zip(b, ids, strict=False)) if x != y), min(len(b), len(ids)))
        for j in range(lo, hi):
            labels[j] = ids[j]
    return ids, labels


def tokenize_messages(tokenizer: Any, messages: list[Message], max_seq_len: int | None = None) -> dict:
    """input_ids and labels (IGNORE_INDEX where masked), cut to max_seq_len from the end."""
    text, spans = assistant_spans(tokenizer, messages)
    try:
        ids, labels = _labels_by_offsets(tokenizer, text, spans)
    except (NotImplementedError, KeyError, TypeError, ValueError):
        ids, labels = _labels_by_prefix_ids(tokenizer, text, spans)
    cut = max_seq_len is not None and len(ids) > max_seq_len
    if cut:
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    return {"input_ids": ids, "labels": labels, "truncated": int(cut)}


@dataclass
class TokenizedFile:
    examples: list[dict]
    truncated: int
    dropped: int  # examples with no trained token left after truncation


def load_tokenized(path: str | Path, tokenizer: Any, max_seq_len: int, what: str = "training_file") -> TokenizedFile:
    """Every example of a file, tokenized; DataError naming the first bad lines if any is bad."""
    report = validate_file(path, None)
    if not report["valid"]:
        first = "; ".join(f"line {e['line']}: {e['message']}" for e in report["errors"][:3])
        total = sum(report["error_counts"].values())
        raise DataError(
            f"{what}: {total} invalid line(s): {first}",
            hint="run `python -m trainer validate FILE` for the full report",
        )
    examples, truncated, dropped = [], 0, 0
    for number, obj in iter_lines(path):
        try:
            ex = tokenize_messages(tokenizer, parse_example(obj), max_seq_len)
        except LineError as err:
            raise DataError(f"{what}: line {number}: {err.message}") from err
        truncated += ex["truncated"]
        if all(label == IGNORE_INDEX for label in ex["labels"][1:]):
            dropped += 1
            continue
        examples.append({"input_ids": ex["input_ids"], "labels": ex["labels"]})
    if not examples:
        raise DataError(
            f"{what}: no example has a trained token within max_seq_len {max_seq_len}",
            hint="raise hyperparameters.max_seq_len",
        )
    return TokenizedFile(examples, truncated, dropped)


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: pad ids, attention 0, labels ignored."""
    longest = max(len(e["input_ids"]) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, longest), pad_id, dtype=torch.long)
    attention = torch.zeros((n, longest), dtype=torch.long)
    labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        input_ids[i, :k] = torch.tensor(e["input_ids"], dtype=torch.long)
        attention[i, :k] = 1
        labels[i, :k] = torch.tensor(e["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
