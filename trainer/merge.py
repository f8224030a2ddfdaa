"""A merged model: the adapter folded into the base's weights, loadable without peft.

The base is loaded again from spec.model, unquantized, in the export dtype, and the adapter is
merged into it with peft's merge_and_unload. For QLoRA this is deliberate: merging into the 4-bit
weights would round every merged weight back to 16 levels, and a 4-bit checkpoint is not what
serving engines load. The result is the bf16 base plus the adapter's update, which differs from
the 4-bit-base-plus-adapter of training by the base's quantization error only.

The merge runs on the CPU: the training model still occupies the GPU at this point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MERGED = "merged"


def merged_model(base: str, adapter_dir: Path, dtype: str = "bf16") -> Any:
    """The base in `dtype` with the adapter in `adapter_dir` merged in (a plain transformers model)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.model import remote_code_allowed

    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=remote_code_allowed(base)
    )
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()


def export_merged(base: str, adapter_dir: Path, tokenizer: Any, dtype: str = "bf16") -> Path:
    """Write adapter_dir/merged/: config, weights and tokenizer of the merged model."""
    out = Path(adapter_dir) / MERGED
    out.mkdir(parents=True, exist_ok=True)
    model = merged_model(base, adapter_dir, dtype)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
