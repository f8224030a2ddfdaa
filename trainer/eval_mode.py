"""Evaluation mode that leaves bitsandbytes' 4-bit weights as training needs them.

On CPUs with AVX512-BF16, bitsandbytes answers an eval-mode Linear4bit forward whose input needs
no gradient with a bf16 kernel, after repacking the layer's weight into a CPU layout for good.
That kernel has no backward: once a validation pass (or the loss head's probe) has run, the next
training steps would get no gradient through the base layers, with only a warning. Keeping the
4-bit layers in train mode during evaluation keeps their layout and their dequantizing path;
nothing else in those layers depends on the mode (dropout lives in the adapters, which do go to
eval mode).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def _is_4bit_linear(module: Any) -> bool:
    return type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes")


@contextmanager
def evaluation(model: Any) -> Iterator[None]:
    """model.eval() for the block, 4-bit base layers excepted; the previous mode afterwards."""
    was_training = model.training
    model.eval()
    for module in model.modules():
        if _is_4bit_linear(module):
            module.training = True
    try:
        yield
    finally:
        model.train(was_training)
