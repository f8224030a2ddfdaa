"""Training data: formats, validation, tokenisation with loss masks, packing, mixing, batching.

One JSONL line is one example, in one of four formats (one format per file):

- chat: {"messages": [{"role": "system"|"user"|"assistant", "content": "...", "weight": 0|1}]};
  the model learns what the assistant says (weight 0 turns are context).
- alpaca: {"instruction": "...", "input": "..." (optional), "output": "..."}; rendered as a
  user turn and an assistant turn through the chat template, so the model is trained in the
  format it will be prompted with.
- prompt_completion: {"prompt": "...", "completion": "..."}; the plain concatenation, as in
  OpenAI's legacy format; the completion is learned.
- text: {"text": "..."}; continued pretraining, every token is learned, and a document longer
  than max_seq_len is split into windows rather than cut.

Every trained span ends with EOS so a trained model stops. `train_on_inputs` also trains the
prompt side (default: false, except raw text where everything is the target).

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

from trainer import token_cache
from trainer.errors import DataError
from trainer.packed_attention import BOUNDS, LONGEST

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
FORMATS = ("chat", "alpaca", "prompt_completion", "text")
MAX_REPORTED_ERRORS = 100
# A line longer than this is refused without being held in memory whole: no single example
# a model could train on comes near it, and an upload must not be a way to exhaust the API.
MAX_LINE_BYTES = 32 * 1024 * 1024

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


@dataclass
class RawText:
    """A non-chat example: text pieces in order, each trained or context."""

    pieces: list[tuple[str, bool]]


Record = list[Message] | RawText


def detect_format(obj: Any) -> str | None:
    """The format a decoded line looks like, by its keys; None when it looks like none."""
    if not isinstance(obj, dict):
        return None
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
}


def _string(obj: dict, key: str, required: bool = True, may_be_empty: bool = False) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise LineError("missing_field", f"'{key}' is missing")
        return ""
    if not isinstance(value, str):
        raise LineError("invalid_type", f"'{key}' must be a string, not {type(value).__name__}")
    if not may_be_empty and not value.strip():
        raise LineError("empty_content", f"'{key}' is empty")
    return value


def parse_record(obj: Any, fmt: str) -> Record:
    """One decoded line of a file in format `fmt`, or LineError naming the first problem."""
    if not isinstance(obj, dict):
        raise LineError("not_object", f"line must be a JSON object, not {type(obj).__name__}")
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
    if fmt == "alpaca":
        instruction = _string(obj, "instruction")
        extra = _string(obj, "input", required=False, may_be_empty=True)
        output = _string(obj, "output")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [Message("user", prompt), Message("assistant", output)]
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
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield number, LineError("invalid_utf8", f"not UTF-8 at byte {exc.start}")
            continue
        try:
            yield number, json.loads(text)
        except json.JSONDecodeError as exc:
            yield number, LineError("invalid_json", f"invalid JSON: {exc.msg} at column {exc.colno}")


def iter_records(path: str | Path, data_format: str = "auto", counter: list[int] | None = None) -> Iterator[tuple[int, str, Record | LineError]]:
    """(line number, the file's format, parsed example or LineError) for every non-blank line.

    With data_format auto, the first line that looks like a format fixes it for the file.
    """
    fmt = None if data_format == "auto" else data_format
    for number, obj in iter_lines(path, counter):
        if isinstance(obj, LineError):
            yield number, fmt or "chat", obj
            continue
        if fmt is None:
            fmt = detect_format(obj)
            if fmt is None:
                keys = ", ".join(sorted(obj)[:5]) if isinstance(obj, dict) else type(obj).__name__
                yield number, "chat", LineError(
                    "unknown_format" if isinstance(obj, dict) else "not_object",
                    f"not an example of any format (keys: {keys}); "
                    "expected 'messages', 'instruction'/'output', 'prompt'/'completion' or 'text'",
                )
                continue
        try:
            yield number, fmt, parse_record(obj, fmt)
        except LineError as err:
            yield number, fmt, err


def trains_inputs(fmt: str, train_on_inputs: bool | None) -> bool:
    return fmt == "text" if train_on_inputs is None else train_on_inputs


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
    seen_format = None if data_format == "auto" else data_format
    counter = [0]

    def fail(line: int, err: LineError) -> None:
        counts[err.code] += 1
        if len(errors) < MAX_REPORTED_ERRORS:
            errors.append({"line": line, "code": err.code, "message": err.message})

    p = Path(path)
    # Kept for the trainer (trainer.token_cache), when every line tokenizes.
    tokenized: list[dict] = []
    if not p.is_file():
        fail(0, LineError("file_not_found", f"{path} is not a readable file"))
    else:
        for number, fmt, rec in iter_records(p, data_format, counter):
            if isinstance(rec, LineError):
                fail(number, rec)
                continue
            seen_format = fmt
            if tokenizer is not None:
                try:
                    ex = tokenize_record(tokenizer, rec, None, trains_inputs(fmt, train_on_inputs))
                except LineError as err:
                    fail(number, err)
                    continue
                tokenized.append({"input_ids": ex["input_ids"], "labels": ex["labels"]})
                n = len(ex["input_ids"])
                longest = max(longest, n)
                for piece in fit_to_length(ex, fmt, max_seq_len):
                    tokens += len(piece["input_ids"])
                    trained += sum(1 for x in piece["labels"] if x != IGNORE_INDEX)
                if max_seq_len is not None and n > max_seq_len and fmt != "text":
                    truncated += 1
                    dropped += all(x == IGNORE_INDEX for x in ex["labels"][:max_seq_len])
            examples += 1
        if examples == 0 and not counts:
            fail(0, LineError("empty_file", "the file has no examples"))
    counted = tokenizer is not None
    if counted and not counts:
        token_cache.save(token_cache.key(p, tokenizer, seen_format or "chat", train_on_inputs), tokenized)
    return {
        "valid": not counts,
        "format": seen_format or "chat",
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


def _spans_to_labels(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> dict:
    try:
        ids, labels = _labels_by_offsets(tokenizer, text, spans)
    except (NotImplementedError, KeyError, TypeError, ValueError):
        ids, labels = _labels_by_prefix_ids(tokenizer, text, spans)
    if labels:
        # The first token has no context to be predicted from; marking it keeps label counts
        # equal whether an example starts a row or sits inside a packed one.
        labels[0] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def _cut(ex: dict, max_seq_len: int | None) -> dict:
    ids, labels = ex["input_ids"], ex["labels"]
    cut = max_seq_len is not None and len(ids) > max_seq_len
    if cut:
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    return {"input_ids": ids, "labels": labels, "truncated": int(cut)}


def tokenize_messages(
    tokenizer: Any, messages: list[Message], max_seq_len: int | None = None, train_on_inputs: bool = False
) -> dict:
    """input_ids and labels (IGNORE_INDEX where masked), cut to max_seq_len from the end."""
    text, spans = assistant_spans(tokenizer, messages)
    if train_on_inputs:
        end = len(text.rstrip())
        spans = [(0, end)] if end else []
    return _cut(_spans_to_labels(tokenizer, text, spans), max_seq_len)


def tokenize_raw(tokenizer: Any, raw: RawText, max_seq_len: int | None = None, train_on_inputs: bool = False) -> dict:
    """Plain concatenation: BOS, the pieces, EOS closing the last trained piece."""
    text = tokenizer.bos_token or ""
    spans = []
    for piece, trained in raw.pieces:
        if trained or train_on_inputs:
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    text += tokenizer.eos_token
    if spans:
        spans[-1] = (spans[-1][0], len(text))
    return _cut(_spans_to_labels(tokenizer, text, spans), max_seq_len)


def tokenize_record(tokenizer: Any, rec: Record, max_seq_len: int | None = None, train_on_inputs: bool = False) -> dict:
    if isinstance(rec, RawText):
        return tokenize_raw(tokenizer, rec, max_seq_len, train_on_inputs)
    return tokenize_messages(tokenizer, rec, max_seq_len, train_on_inputs)


def fit_to_length(ex: dict, fmt: str, max_seq_len: int | None) -> list[dict]:
    """The pieces of one tokenized example that training uses.

    Raw text is split into windows, since a corpus document has no end that matters more than
    its middle; any other example keeps its head, where the prompt is.
    """
    ids, labels = ex["input_ids"], ex["labels"]
    if max_seq_len is None or len(ids) <= max_seq_len:
        return [{"input_ids": ids, "labels": labels}]
    if fmt != "text":
        return [{"input_ids": ids[:max_seq_len], "labels": labels[:max_seq_len]}]
    pieces = []
    for i in range(0, len(ids), max_seq_len):
        window = labels[i : i + max_seq_len]
        pieces.append({"input_ids": ids[i : i + max_seq_len], "labels": [IGNORE_INDEX, *window[1:]]})
    return pieces


@dataclass
class TokenizedFile:
    examples: list[dict]
    truncated: int
    dropped: int  # examples with no trained token left after truncation
    format: str = "chat"


def _tokenized(path: str | Path, tokenizer: Any, fmt: str, train_on_inputs: bool | None, what: str) -> list[dict]:
    """Every example of the file before any cut: from the data check's cache, else tokenized now
    (and kept for the next run)."""
    key = token_cache.key(path, tokenizer, fmt, train_on_inputs)
    cached = token_cache.load(key)
    if cached is not None:
        return cached
    done = []
    for number, _, rec in iter_records(path, fmt):
        try:
            if isinstance(rec, LineError):
                raise rec
            done.append(tokenize_record(tokenizer, rec, None, trains_inputs(fmt, train_on_inputs)))
        except LineError as err:
            raise DataError(f"{what}: line {number}: {err.message}") from err
    token_cache.save(key, done)
    return done


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
    examples, truncated, dropped = [], 0, 0
    for ex in _tokenized(path, tokenizer, fmt, train_on_inputs, what):
        pieces = fit_to_length(ex, fmt, max_seq_len)
        truncated += fmt != "text" and len(ex["input_ids"]) > max_seq_len
        for piece in pieces:
            if all(label == IGNORE_INDEX for label in piece["labels"]):
                dropped += fmt != "text"
                continue
            examples.append(piece)
    if not examples:
        raise DataError(
            f"{what}: no example has a trained token within max_seq_len {max_seq_len}",
            hint="raise hyperparameters.max_seq_len",
        )
    return TokenizedFile(examples, truncated, dropped, fmt)


# ---------------------------------------------------------------------------------------------
# Mixing and packing


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


# ---------------------------------------------------------------------------------------------
# Batching


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: pad ids, attention 0, labels ignored.

    Packed rows also get position_ids; their padding counts up from 0 like one more example,
    so it stays a block of its own that no real token attends to.
    """
    longest = max(len(e["input_ids"]) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, longest), pad_id, dtype=torch.long)
    attention = torch.zeros((n, longest), dtype=torch.long)
    labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
    packed = "position_ids" in examples[0]
    positions = torch.zeros((n, longest), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        input_ids[i, :k] = torch.tensor(e["input_ids"], dtype=torch.long)
        attention[i, :k] = 1
        labels[i, :k] = torch.tensor(e["labels"], dtype=torch.long)
        if packed:
            positions[i, :k] = torch.tensor(e["position_ids"], dtype=torch.long)
            positions[i, k:] = torch.arange(longest - k)
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    if packed:
        batch["position_ids"] = positions
    return batch


def model_inputs(batch: dict[str, torch.Tensor], device: Any) -> dict[str, torch.Tensor]:
    """What the model's forward takes: a packed batch passes position_ids and no attention mask,
    which is how transformers recognises packed sequences and builds block-diagonal attention.
    It does so only without a KV cache, hence use_cache=False even where the config enables it.
    The copies do not block: from a pinned batch (the training loop pins them) they run behind
    the queued kernels instead of making the host wait for them."""
    if "position_ids" in batch:
        inputs = {"input_ids": batch["input_ids"].to(device, non_blocking=True),
                  "position_ids": batch["position_ids"].to(device, non_blocking=True), "use_cache": False}
        if BOUNDS in batch:  # trainer.packed_attention's, found on the host
            inputs[BOUNDS] = batch[BOUNDS].to(device, non_blocking=True)
            inputs[LONGEST] = int(batch[LONGEST])
        return inputs
    return {"input_ids": batch["input_ids"].to(device, non_blocking=True),
            "attention_mask": batch["attention_mask"].to(device, non_blocking=True)}
