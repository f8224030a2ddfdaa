"""TRL's SFTTrainer on a text JSONL with its own packing: the peer row of bench/service_throughput.py.

TRL tokenizes the file and packs it itself (best-fit decreasing into rows of max_length, batches
flattened padding-free; transformers then masks across the packed examples from position ids),
with its defaults otherwise (gradient checkpointing on, bf16), LoRA on all linear layers through
peft. Each step is timed between CUDA synchronizations by a callback; its tokens are the
non-padding input tokens of the batch the collator built for it, so tokens/s counts what
tuneq's job rows count.

    python bench/trl_packed.py --model-dir DIR --data train.jsonl --out result.json [--no-checkpointing]

Run in its own interpreter: TRL and the Trainer patch nothing of tuneq's, but a fresh process
also gives each row its own CUDA peak.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--strategy", default="bfd", choices=("bfd", "wrapped"),
                   help="TRL's packing: bfd (its default: whole examples, padding-free, masked apart) or wrapped "
                   "(the file cut into rows of max_length: no mask between examples, plain causal attention)")
    p.add_argument("--dry-run", action="store_true", help="CPU, fp32")
    args = p.parse_args()

    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda:
        _plain_lm_head()
    started = time.time()
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=torch.bfloat16 if cuda else torch.float32, attn_implementation="sdpa",
        **({"device_map": {"": 0}} if cuda else {}))
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    dataset = load_dataset("json", data_files=args.data, split="train")
    loaded = time.time()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    step_s: list[float] = []
    step_tokens: list[int] = []
    batches: list[int] = []  # non-padding tokens of each batch, in the order the collator built them

    class Clock(TrainerCallback):
        def on_step_begin(self, _args, state, control, **kwargs):
            sync()
            self.t = time.perf_counter()

        def on_step_end(self, _args, state, control, **kwargs):
            sync()
            step_s.append(time.perf_counter() - self.t)

    config = SFTConfig(
        output_dir=str(args.out.with_suffix(".trl")), per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, max_steps=args.steps, max_length=args.seq, packing=True,
        packing_strategy=args.strategy,
        learning_rate=2e-4, warmup_steps=2, lr_scheduler_type="cosine", logging_steps=10_000, save_strategy="no",
        report_to="none", dataloader_num_workers=0, seed=0, dataset_text_field="text",
        **({"gradient_checkpointing": False} if args.no_checkpointing else {}),
        **({"bf16": False, "use_cpu": True} if not cuda else {}),
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
        peft_config=LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules="all-linear",
                               lora_dropout=0.0, task_type="CAUSAL_LM"),
        callbacks=[Clock()],
    )
    collate = trainer.data_collator

    def counting(examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = collate(examples)
        mask = out.get("attention_mask")
        # Padding-free batches (bfd packing) are one flattened row with no padding at all.
        batches.append(int(mask.sum()) if mask is not None else out["input_ids"].numel())
        return out

    trainer.data_collator = counting
    prepared = time.time()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    output = trainer.train()
    ended = time.time()
    step_tokens = batches[: len(step_s)]
    result = {
        "name": "trl-lora" + ("-wrapped" if args.strategy == "wrapped" else "") + ("-nockpt" if args.no_checkpointing else ""),
        "ok": len(step_s) == args.steps,
        "gradient_checkpointing": not args.no_checkpointing,
        "packing_strategy": config.packing_strategy, "padding_free": bool(getattr(trainer, "padding_free", False)),
        "step_tps": [round(t / s) for t, s in zip(step_tokens, step_s, strict=True)],
        "step_s": step_s, "step_tokens": step_tokens,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "load_s": round(loaded - started, 2), "prepare_s": round(prepared - loaded, 2),
        "train_s": round(ended - prepared, 2), "loss": float(output.training_loss),
        "packed_rows": len(trainer.train_dataset),
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("step_s", "step_tokens")}))
    return 0


def _plain_lm_head() -> None:
    """TRL's fused LM head is a Triton kernel, which CPU torch lacks: a CPU wiring check computes
    the same per-token values with full logits (the GPU rows use TRL's own kernel)."""
    import torch
    import trl.trainer.utils as trl_utils

    class Plain:
        @staticmethod
        def apply(hidden, weight, bias, targets, temperature, _chunk, _softcap, _scale, outputs):
            logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature
            logp = logits.log_softmax(-1)
            entropy = -(logp.exp() * logp).sum(-1) if "entropy" in outputs else None
            top1 = (logits.argmax(-1) == targets) if "is_top1" in outputs else None
            return logp.gather(-1, targets[:, None]).squeeze(-1), entropy, None, None, top1

    if trl_utils._ChunkedLogProbFunction is None:
        trl_utils._ChunkedLogProbFunction = Plain


if __name__ == "__main__":
    raise SystemExit(main())
