"""Batches as the model takes them: padded tensors, on the device."""

from __future__ import annotations

from typing import Any

import torch

from trainer.data.tokenize import IGNORE_INDEX, REJECTED_IDS, REJECTED_LABELS
from trainer.packed_attention import BOUNDS, LONGEST

# A preference batch of n pairs has 2n rows, the n preferred outputs then the n others (one forward
# runs both); this key holds n.
PAIRS = "pairs"


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: pad ids, attention 0, labels ignored.

    Packed rows also get position_ids; their padding counts up from 0 like one more example,
    so it stays a block of its own that no real token attends to. Preference pairs become two
    rows each (see PAIRS).
    """
    if REJECTED_IDS in examples[0]:
        rows = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
        rows += [{"input_ids": e[REJECTED_IDS], "labels": e[REJECTED_LABELS]} for e in examples]
        return {**collate(rows, pad_id), PAIRS: torch.tensor(len(examples))}
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
