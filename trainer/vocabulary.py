"""The closed sets of values of a job's fields: methods, formats, precisions, speeds, strategies.

trainer.spec.JobSpec types its fields with these. They live apart from it, in plain typing, so
that the CLI can offer them (`tuneq submit --method`) without importing pydantic and the spec.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

# freeze: full fine-tuning of the top layers only; ia3 and prefix: the adapter family besides LoRA.
Method = Literal["full", "lora", "qlora", "ia3", "prefix", "freeze"]
METHODS: tuple[str, ...] = get_args(Method)
DEFAULT_METHOD: Method = "lora"
# The spec fields that hold each method's settings, its own first (lora and qlora share LoRA's;
# qlora adds the quantization of its base). Requests name them under method.<name>.
METHOD_SETTINGS: dict[str, tuple[str, ...]] = {
    "full": (), "lora": ("lora",), "qlora": ("lora", "quantization"), "ia3": ("ia3",), "prefix": ("prefix",),
    "freeze": ("freeze",),
}
# preference: OpenAI's DPO lines ({"input": {"messages"}, "preferred_output", "non_preferred_output"}).
DataFormat = Literal["auto", "chat", "alpaca", "prompt_completion", "text", "preference"]
# What the loss trains toward. sft: the examples' assistant tokens (cross-entropy). The preference
# objectives train on pairs, a preferred output over a non-preferred one for the same input:
# dpo against a frozen reference (the base with the adapter off, or a frozen copy for whole-weight
# methods); simpo (length-normalised log-probabilities with a target margin) and orpo (the
# preferred output's loss plus an odds-ratio term) need no reference.
Objective = Literal["sft", "dpo", "simpo", "orpo"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)
PREFERENCE_OBJECTIVES: tuple[str, ...] = ("dpo", "simpo", "orpo")
# What beta "auto" means for each: DPO's customary 0.1 (the DPO paper's and TRL's default), SimPO's
# 2.0 (its paper's usual setting) and ORPO's odds-ratio weight lambda 0.1 (its paper's).
AUTO_BETA: dict[str, float] = {"dpo": 0.1, "simpo": 2.0, "orpo": 0.1}
# SimPO's target reward margin gamma, as a share of beta when not given (its paper's 0.5 ratio).
SIMPO_GAMMA_BETA_RATIO = 0.5
# What a preference job reports besides train_loss, per metrics event (means per pair over the
# interval) and per validation pass: the rewards of the preferred ("chosen") and non-preferred
# ("rejected") outputs, their margin, and the share of pairs whose preferred output has the higher reward.
PREFERENCE_TRAIN_METRICS: tuple[str, ...] = ("train_preference_accuracy", "train_chosen_reward",
                                             "train_rejected_reward", "train_reward_margin")
PREFERENCE_VALID_METRICS: tuple[str, ...] = ("valid_preference_accuracy", "full_valid_preference_accuracy")
Precision = Literal["auto", "bf16", "fp32"]
# lean: gradient checkpointing, least memory; fast: keep activations, about a third less compute;
# balanced: checkpoint only the bottom checkpoint_layers decoder layers (as many as memory needs).
Speed = Literal["auto", "lean", "fast", "balanced"]
FullPrecision = Literal["fp32_master", "bf16"]
Strategy = Literal["auto", "ddp", "fsdp"]
# Hosts one job may span. A job asks for `gpus` GPUs on each of `nodes` hosts: nodes x gpus ranks
# in all, one global batch of nodes x gpus x batch_size x gradient_accumulation_steps examples.
MAX_NODES = 64
# adamw: torch's AdamW (its fused kernel on a GPU, as before this option existed);
# adamw_fused: the fused kernel on any device; the bitsandbytes ones keep m and v in 8 bits
# (adamw_8bit) and/or in paged memory that the driver may move to the CPU under pressure.
Optimizer = Literal["adamw", "adamw_fused", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
# Those torch implements; the others are bitsandbytes' (trainer.optim), which keep their own state
# layout and cannot step a layer inside backward.
TORCH_OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw_fused")
# bitsandbytes' class of each of the others, by its name in bitsandbytes.optim.
BITSANDBYTES_OPTIMIZERS: dict[str, str] = {"adamw_8bit": "AdamW8bit", "paged_adamw": "PagedAdamW",
                                           "paged_adamw_8bit": "PagedAdamW8bit"}

# The allowed values of each choice, for whoever offers them (the API's schema, the CLI's options,
# the planner): read from the types so they cannot drift.
DATA_FORMATS: tuple[str, ...] = get_args(DataFormat)
PRECISIONS: tuple[str, ...] = get_args(Precision)
SPEEDS: tuple[str, ...] = get_args(Speed)
FULL_PRECISIONS: tuple[str, ...] = get_args(FullPrecision)
STRATEGIES: tuple[str, ...] = get_args(Strategy)
# Methods that train whole weights (and so can shard them with FSDP); the others train adapters.
WHOLE_WEIGHT_METHODS: tuple[str, ...] = ("full", "freeze")

# How an eval block scores a generated answer against a line's expected one (trainer.graders):
# exact_match and contains compare text, regex searches the answer for the grader's pattern,
# similarity is the normalised Levenshtein similarity (1 - edit distance / longer length).
GraderType = Literal["exact_match", "contains", "regex", "similarity"]
GRADER_TYPES: tuple[str, ...] = get_args(GraderType)
# An eval pass's figures besides the graders' scores (eval_<grader name>).
EVAL_FIGURES: tuple[str, ...] = ("eval_seconds", "eval_examples")


def eval_scores(metrics: dict[str, Any]) -> dict[str, float]:
    """The eval_<grader> scores among metrics (an eval event's, a checkpoint's, a job's)."""
    return {k: v for k, v in metrics.items() if k.startswith("eval_") and k not in EVAL_FIGURES
            and isinstance(v, int | float) and not isinstance(v, bool)}


# The services a job's curves go to besides tuneq's own (OpenAI's `integrations`): wandb is an
# offline Weights & Biases run in the job's artifacts (trainer.tracking).
IntegrationType = Literal["wandb"]
INTEGRATION_TYPES: tuple[str, ...] = get_args(IntegrationType)

# Which weights final/: the last step's, or the checkpoint's with the best eval score.
ExportSelect = Literal["last", "best"]
EXPORT_SELECTS: tuple[str, ...] = get_args(ExportSelect)


def extra_files(spec: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(field path, file, format it must have) of every file a job spec names besides its
    training_file and validation_file: mix and forgetting files (any training format, "auto")
    and the eval block's file ("eval"). The spec is a dict, as sent, stored or run: the API,
    the CLI and the worker name and resolve these files from this one list."""
    found = [(f"mix[{k}].file", m.get("file"), "auto") for k, m in enumerate(spec.get("mix") or [])
             if isinstance(m, dict)]
    found.append(("forgetting_file", spec.get("forgetting_file"), "auto"))
    block = spec.get("eval")
    if isinstance(block, dict):
        found.append(("eval.file", block.get("file"), "eval"))
    return [(param, value, fmt) for param, value, fmt in found if isinstance(value, str) and value]


def with_files(spec: dict[str, Any], files: dict[str, str]) -> dict[str, Any]:
    """A copy of the spec with the files of extra_files replaced, by field path (ids by paths)."""
    out = dict(spec)
    if out.get("mix"):
        out["mix"] = [{**m, "file": files.get(f"mix[{k}].file", m.get("file"))} if isinstance(m, dict) else m
                      for k, m in enumerate(out["mix"])]
    if "forgetting_file" in files:
        out["forgetting_file"] = files["forgetting_file"]
    if "eval.file" in files and isinstance(out.get("eval"), dict):
        out["eval"] = {**out["eval"], "file": files["eval.file"]}
    return out
