"""Tokenisation with loss masks: input_ids and labels (IGNORE_INDEX where the loss is not taken).

Masks come from the tokenizer's own chat template, not from guessing its markers: each
assistant turn's text span is found by rendering the conversation up to the turn (with the
generation prompt) and up to its end, and every token overlapping that span is trained. This
works for any template and tokenizer, including BPE merges across turn boundaries.

Every trained span ends with EOS so a trained model stops. The tokenizer is passed in: nothing
here imports transformers or torch.
"""

from __future__ import annotations

import json
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from trainer.data.parse import Chat, LineError, Message, Preference, RawText, Record

# A tokenized preference pair holds the preferred output's row as input_ids/labels and the other's
# under these keys; labels mark only the output's tokens.
REJECTED_IDS, REJECTED_LABELS = "rejected_input_ids", "rejected_labels"

IGNORE_INDEX = -100

T = TypeVar("T")

# An assistant turn's tool calls, after its content: one <tool_call>{"name", "arguments"}</tool_call> a line.
TOOL_CALLS_JINJA = (
    "{% for call in message['tool_calls'] or [] %}"
    "{% if message['content'] or not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<tool_call>' + {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson"
    " + '</tool_call>' }}"
    "{% endfor %}"
)

# For tokenizers without a chat template (base models). Plain-text role markers; EOS after each
# assistant turn so the model learns to stop. Tools, tool calls and tool turns as in trainer.tiny.
FALLBACK_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% if tools %}{{ '### Tools:' }}"
    "{% for tool in tools %}{{ '\n' + tool['function'] | tojson }}{% endfor %}{{ '\n\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '### ' + ('system' if message['role'] == 'developer' else message['role']) | capitalize + ':\n' }}"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    + TOOL_CALLS_JINJA +
    "{% if message['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}"
    "{{ '\n\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


def render_chat(tokenizer: Any, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None = None) -> str:
    """A conversation as the model sees it in training (and, with a generation prompt, when it answers)."""
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt,
        **({"tools": tools} if tools else {}),
    )


def _as_template_message(m: Message, knows_developer: bool) -> dict:
    # OpenAI's developer role is the system role of newer models; templates that predate it get "system".
    role = "system" if m.role == "developer" and not knows_developer else m.role
    out: dict[str, Any] = {"role": role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = m.tool_calls
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    return out


def _check_tools_rendered(full: str, messages: list[Message], tools: list[dict] | None) -> None:
    """A template that knows no tools drops them silently; training would then teach empty turns."""
    for tool in tools or ():
        if tool["function"]["name"] not in full:
            raise LineError("template_error", "the model's chat template does not render the line's tools "
                                              f"(no {tool['function']['name']!r} in its output)")
    for m in messages:
        for call in m.tool_calls or ():
            if call["function"]["name"] not in full:
                raise LineError("template_error", "the model's chat template does not render tool calls "
                                                  f"(no {call['function']['name']!r} in its output)")
        # Some templates (Llama 3.1's) write a tool's answer through tojson: escaped, not verbatim.
        answer = m.content.strip()
        if m.role == "tool" and answer not in full and json.dumps(answer, ensure_ascii=False)[1:-1] not in full:
            raise LineError("template_error", "the model's chat template does not render tool messages")


def chat_prompt_ids(tokenizer: Any, messages: list[dict]) -> list[int]:
    """The token ids a model answers after: the conversation and the generation prompt, rendered
    and tokenized as training renders and tokenizes its examples."""
    return list(tokenizer(render_chat(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"])


def _common_prefix(a: str, b: str) -> int:
    """Length of the common prefix. Renders of one conversation share thousands of characters:
    compared in halving blocks (each a C-level slice comparison), not a character at a time."""
    n = min(len(a), len(b))
    i, step = 0, 1 << max(0, n.bit_length() - 1)
    while step:
        if i + step <= n and a[i:i + step] == b[i:i + step]:
            i += step
        step >>= 1
    return i


def assistant_spans(tokenizer: Any, messages: Chat | list[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its trained assistant turns.

    A span starts where the generation prompt ends and stops at the end of the turn (EOS
    included), without the template's trailing whitespace, which the model never has to emit.
    Common prefixes rather than exact prefix checks keep this right for templates that rewrite
    earlier turns (e.g. drop reasoning from past assistant messages).
    """
    tools = getattr(messages, "tools", None)
    knows_developer = "developer" in (getattr(tokenizer, "chat_template", None) or "")
    plain = [_as_template_message(m, knows_developer) for m in messages]
    try:
        full = render_chat(tokenizer, plain, add_generation_prompt=False, tools=tools)
        spans = []
        for i, m in enumerate(messages):
            if m.role != "assistant" or not m.weight:
                continue
            try:
                head = render_chat(tokenizer, plain[:i], add_generation_prompt=True, tools=tools) if i else ""
            except Exception:  # noqa: BLE001 - some templates refuse a conversation without a user turn
                head = ""
            start = _common_prefix(head, full)
            end = _common_prefix(render_chat(tokenizer, plain[: i + 1], add_generation_prompt=False, tools=tools), full)
            while end > start and full[end - 1].isspace():
                end -= 1
            if end > start:
                spans.append((start, end))
    except Exception as exc:  # noqa: BLE001 - jinja raise_exception and template bugs alike
        raise LineError("template_error", f"the chat template rejected this conversation: {exc}") from exc
    _check_tools_rendered(full, messages, tools)
    return full, spans


def _labels_by_offsets(ids: list[int], offsets: list[tuple[int, int]],
                       spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    if len(offsets) != len(ids):
        raise ValueError("offsets do not match the tokens")
    # A token is trained if it overlaps a span. Spans are few and sorted, offsets ascend: each
    # span's tokens are one run, found by bisection (a per-token loop dominated large files' checks).
    starts = [s for s, _ in offsets]
    ends = [e for _, e in offsets]
    labels = [IGNORE_INDEX] * len(ids)
    if starts != sorted(starts) or ends != sorted(ends):  # not seen from a real tokenizer; token by token
        for i, (s, e) in enumerate(offsets):
            if any(s < hi_char and e > lo_char for lo_char, hi_char in spans):
                labels[i] = ids[i]
        return ids, labels
    for lo_char, hi_char in spans:
        lo = bisect_right(ends, lo_char)  # the first token ending after the span's start
        hi = bisect_left(starts, hi_char, lo)  # the first token starting at or after its end
        labels[lo:hi] = ids[lo:hi]
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


Labelled = tuple[str, list[tuple[int, int]]]  # a text as the model reads it, and its trained character spans


def encode_labelled(tokenizer: Any, texts: list[Labelled]) -> list[dict]:
    """input_ids and labels of each text: the tokens overlapping its spans are trained.

    The texts go to the tokenizer in one call: a fast tokenizer encodes a batch on all the host's
    cores (unless TOKENIZERS_PARALLELISM is false), where one call per text keeps to one core.
    A batch's encodings are each text's own, so the result is the same either way.
    """
    if not texts:
        return []
    try:
        enc = tokenizer([t for t, _ in texts], add_special_tokens=False, return_offsets_mapping=True)
        encoded = list(zip(enc["input_ids"], enc["offset_mapping"], strict=True))
    except (NotImplementedError, KeyError, TypeError, ValueError):  # a slow tokenizer: no offsets
        encoded = [None] * len(texts)
    out = []
    for (text, spans), got in zip(texts, encoded, strict=True):
        try:
            if got is None:
                raise ValueError("no offsets")
            ids, labels = _labels_by_offsets(list(got[0]), got[1], spans)
        except ValueError:
            ids, labels = _labels_by_prefix_ids(tokenizer, text, spans)
        if labels:
            # The first token has no context to be predicted from; marking it keeps label counts
            # equal whether an example starts a row or sits inside a packed one.
            labels[0] = IGNORE_INDEX
        out.append({"input_ids": ids, "labels": labels})
    return out


def _cut(ex: dict, max_seq_len: int | None) -> dict:
    ids, labels = ex["input_ids"], ex["labels"]
    cut = max_seq_len is not None and len(ids) > max_seq_len
    if cut:
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    return {"input_ids": ids, "labels": labels, "truncated": int(cut)}


def chat_text(tokenizer: Any, messages: Chat | list[Message], train_on_inputs: bool = False) -> Labelled:
    """The rendered conversation and its trained spans (the assistant turns, or all of it)."""
    text, spans = assistant_spans(tokenizer, messages)
    if train_on_inputs:
        end = len(text.rstrip())
        spans = [(0, end)] if end else []
    return text, spans


def raw_text(tokenizer: Any, raw: RawText, train_on_inputs: bool = False) -> Labelled:
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
    return text, spans


def tokenize_messages(
    tokenizer: Any, messages: Chat | list[Message], max_seq_len: int | None = None, train_on_inputs: bool = False
) -> dict:
    """input_ids and labels (IGNORE_INDEX where masked), cut to max_seq_len from the end."""
    return _cut(encode_labelled(tokenizer, [chat_text(tokenizer, messages, train_on_inputs)])[0], max_seq_len)


def tokenize_raw(tokenizer: Any, raw: RawText, max_seq_len: int | None = None, train_on_inputs: bool = False) -> dict:
    """input_ids and labels of raw_text's concatenation, cut to max_seq_len."""
    return _cut(encode_labelled(tokenizer, [raw_text(tokenizer, raw, train_on_inputs)])[0], max_seq_len)


def prompt_ids(tokenizer: Any, messages: list[Message]) -> list[int]:
    """chat_prompt_ids of a parsed line's messages (an eval line's); LineError when the template refuses them."""
    try:
        return chat_prompt_ids(tokenizer, [{"role": m.role, "content": m.content} for m in messages])
    except Exception as exc:  # noqa: BLE001 - jinja raise_exception and template bugs alike
        raise LineError("template_error", f"the chat template rejected this conversation: {exc}") from exc


def _pair_texts(tokenizer: Any, pair: Preference) -> list[Labelled]:
    """Both rows of a pair through the chat template: the input, then each output; only the
    output's tokens are labelled (the two rows share the input's tokens)."""
    tools = getattr(pair.prompt, "tools", None)  # the input's tools, rendered before both rows
    return [chat_text(tokenizer, Chat([*pair.prompt, *pair.preferred], tools)),
            chat_text(tokenizer, Chat([*pair.prompt, *pair.non_preferred], tools))]


def _pair(chosen: dict, rejected: dict, max_seq_len: int | None) -> dict:
    chosen, rejected = _cut(chosen, max_seq_len), _cut(rejected, max_seq_len)
    return {"input_ids": chosen["input_ids"], "labels": chosen["labels"], REJECTED_IDS: rejected["input_ids"],
            REJECTED_LABELS: rejected["labels"], "truncated": max(chosen["truncated"], rejected["truncated"])}


def tokenize_preference(tokenizer: Any, pair: Preference, max_seq_len: int | None = None) -> dict:
    """Both rows of a pair, as _pair_texts renders them."""
    return _pair(*encode_labelled(tokenizer, _pair_texts(tokenizer, pair)), max_seq_len)


def trained_in(piece: dict) -> bool:
    """Whether a piece has a labelled token (both rows of a pair must)."""
    rows = [piece["labels"]] + ([piece[REJECTED_LABELS]] if REJECTED_LABELS in piece else [])
    return all(any(x != IGNORE_INDEX for x in row) for row in rows)


def piece_tokens(piece: dict) -> tuple[int, int]:
    """(tokens, labelled tokens) of a piece, both rows of a pair together."""
    rows = [(piece["input_ids"], piece["labels"])]
    if REJECTED_IDS in piece:
        rows.append((piece[REJECTED_IDS], piece[REJECTED_LABELS]))
    return sum(len(i) for i, _ in rows), sum(sum(1 for x in lab if x != IGNORE_INDEX) for _, lab in rows)


def record_texts(tokenizer: Any, rec: Record, train_on_inputs: bool = False) -> list[Labelled]:
    """The texts a record is encoded as: one, or a preference pair's two rows. LineError when the
    chat template refuses the record."""
    if isinstance(rec, Preference):
        return _pair_texts(tokenizer, rec)
    if isinstance(rec, RawText):
        return [raw_text(tokenizer, rec, train_on_inputs)]
    return [chat_text(tokenizer, rec, train_on_inputs)]


def _assembled(rec: Record, encoded: list[dict], max_seq_len: int | None) -> dict:
    if isinstance(rec, Preference):
        return _pair(*encoded, max_seq_len)
    return _cut(encoded[0], max_seq_len)


def tokenize_record(tokenizer: Any, rec: Record, max_seq_len: int | None = None, train_on_inputs: bool = False) -> dict:
    return _assembled(rec, encode_labelled(tokenizer, record_texts(tokenizer, rec, train_on_inputs)), max_seq_len)


# Records whose texts go to the tokenizer in one call: enough for a batch to spread over many
# cores, few enough that a chunk's token lists stay small beside the file's.
CHUNK_RECORDS = 256


def tokenize_stream(tokenizer: Any, items: Iterable[tuple[T, Record | None, bool]],
                    chunk: int = CHUNK_RECORDS) -> Iterator[tuple[T, dict | LineError | None]]:
    """tokenize_record of each (tag, record, train_on_inputs), in order: (tag, the example, or the
    LineError its template raised). A None record passes through as (tag, None). The texts of
    `chunk` records at a time are encoded in one call (encode_labelled)."""
    pending: list[tuple[T, Record | None, bool]] = []

    def flush() -> Iterator[tuple[T, dict | LineError | None]]:
        texts: list[Labelled] = []
        rendered: list[list[Labelled] | LineError | None] = []
        for _, rec, toi in pending:
            if rec is None:
                rendered.append(None)
                continue
            try:
                rendered.append(record_texts(tokenizer, rec, toi))
                texts += rendered[-1]
            except LineError as err:
                rendered.append(err)
        encoded = iter(encode_labelled(tokenizer, texts))
        for (tag, rec, _), got in zip(pending, rendered, strict=True):
            if isinstance(got, list):
                yield tag, _assembled(rec, [next(encoded) for _ in got], None)
            else:
                yield tag, got
        pending.clear()

    for item in items:
        pending.append(item)
        if len(pending) >= chunk:
            yield from flush()
    yield from flush()


def fit_to_length(ex: dict, fmt: str, max_seq_len: int | None) -> list[dict]:
    """The pieces of one tokenized example that training uses.

    Raw text is split into windows, since a corpus document has no end that matters more than
    its middle; any other example keeps its head, where the prompt is.
    """
    ids, labels = ex["input_ids"], ex["labels"]
    if REJECTED_IDS in ex:  # a pair: each row keeps its head
        n = max_seq_len
        return [{"input_ids": ids[:n], "labels": labels[:n], REJECTED_IDS: ex[REJECTED_IDS][:n],
                 REJECTED_LABELS: ex[REJECTED_LABELS][:n]}]
    if max_seq_len is None or len(ids) <= max_seq_len:
        return [{"input_ids": ids, "labels": labels}]
    if fmt != "text":
        return [{"input_ids": ids[:max_seq_len], "labels": labels[:max_seq_len]}]
    pieces = []
    for i in range(0, len(ids), max_seq_len):
        window = labels[i : i + max_seq_len]
        pieces.append({"input_ids": ids[i : i + max_seq_len], "labels": [IGNORE_INDEX, *window[1:]]})
    return pieces
