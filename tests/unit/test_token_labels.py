"""Loss masks by character spans: every token that overlaps a trained span is labelled, others are
IGNORE_INDEX, whatever the text (multi-byte characters, tokens across a span's edge)."""

from __future__ import annotations

import random
from pathlib import Path

from trainer.data.tokenize import IGNORE_INDEX, _common_prefix, encode_labelled
from trainer.model import load_tokenizer


def _by_definition(tokenizer, text: str, spans: list[tuple[int, int]]) -> list[int]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [tid if any(s < hi and e > lo for lo, hi in spans) else IGNORE_INDEX
            for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]


def test_labels_are_the_tokens_overlapping_the_spans(tiny_model_dir: Path) -> None:
    """Texts encoded in one batch get each text's own tokens, labelled by the definition (the
    first token never: it has nothing to be predicted from)."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    rng = random.Random(0)
    alphabet = "ab cd\u00e9\u4e2d\U0001f600\n"
    texts = []
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, 2 * rng.randint(0, 3))))
        texts.append((text, [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2)]))
    for (text, spans), got in zip(texts, encode_labelled(tokenizer, texts), strict=True):
        expected = _by_definition(tokenizer, text, spans)
        assert got["labels"] == [IGNORE_INDEX, *expected[1:]][: len(expected)], (text, spans)
        assert got["input_ids"] == list(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_common_prefix_is_the_length_both_strings_share() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        a = "".join(rng.choice("ab") for _ in range(rng.randint(0, 70)))
        b = a[: rng.randint(0, len(a))] + "".join(rng.choice("abc") for _ in range(rng.randint(0, 9)))
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        assert _common_prefix(a, b) == _common_prefix(b, a) == n
