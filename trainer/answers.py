"""The eval pass of a job's eval block: the model answers the eval file's prompts, graders score them.

Prompts are rendered with the tokenizer's chat template (its generation prompt at the end),
left-padded into batches of eval.batch_size and decoded greedily (or sampled, seeded, with a
temperature) for at most eval.max_new_tokens tokens; generation stops at EOS. Under several
processes each rank answers its share of the prompts on its own whole model and the answers are
gathered, so every rank computes the same scores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.data.parse import EVAL_FORMAT, EvalItem, LineError, iter_records
from trainer.data.tokenize import prompt_ids
from trainer.data.validate import validate_file
from trainer.errors import DataError
from trainer.eval_mode import evaluation
from trainer.eval_settings import EvalSettings
from trainer.graders import grade

SAMPLES = 3  # answers shown in each eval event, beside the scores
SAMPLE_CHARS = 200


@dataclass
class EvalSet:
    prompts: list[list[int]]  # token ids, rendered for the model to answer
    questions: list[str]  # the last user turn of each, for the samples shown
    expected: list[str]


def load_eval_set(path: str | Path, tokenizer: Any, settings: EvalSettings) -> EvalSet:
    """The first eval.max_examples lines of the eval file, rendered; DataError naming bad lines."""
    report = validate_file(path, None, data_format=EVAL_FORMAT)
    if not report["valid"]:
        first = "; ".join(f"line {e['line']}: {e['message']}" for e in report["errors"][:3])
        raise DataError(f"eval.file: {sum(report['error_counts'].values())} invalid line(s): {first}",
                        hint="an eval line is {\"messages\": [... ending with a user turn], \"expected\": \"...\"}")
    out = EvalSet([], [], [])
    for number, _, item in iter_records(path, EVAL_FORMAT):
        if len(out.prompts) >= settings.max_examples:
            break
        assert isinstance(item, EvalItem)
        try:
            out.prompts.append(prompt_ids(tokenizer, item.messages))
        except LineError as err:
            raise DataError(f"eval.file: line {number}: {err.message}") from err
        out.questions.append(item.messages[-1].content)
        out.expected.append(item.expected)
    return out


def decoding_options(tokenizer: Any, temperature: float, top_p: float = 1.0) -> dict[str, Any]:
    """model.generate's options for greedy decoding (temperature 0) or sampling: what eval passes
    and chat completions (worker/generation.py) both decode with."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # use_cache: training may have turned the model's KV cache off (gradient checkpointing).
    options: dict[str, Any] = {"use_cache": True, "pad_token_id": pad, "eos_token_id": tokenizer.eos_token_id}
    if temperature > 0:
        options.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:  # the model's generation_config may ask for sampling settings that greedy decoding ignores
        options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return options


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: list[list[int]], settings: EvalSettings, device: torch.device,
             seed: int) -> list[str]:
    """The model's answer to each prompt, in order: batched, left-padded, stopped at EOS."""
    options = decoding_options(tokenizer, settings.temperature)
    pad = options["pad_token_id"]
    answers: list[str] = []
    devices = [device] if device.type == "cuda" else []
    with evaluation(model), torch.random.fork_rng(devices=devices):  # training's RNG stream stays as it was
        torch.manual_seed(seed)
        for i in range(0, len(prompts), settings.batch_size):
            batch = prompts[i : i + settings.batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=settings.max_new_tokens, **options)
            answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [a.strip() for a in answers]


def eval_pass(model: Any, tokenizer: Any, eval_set: EvalSet, settings: EvalSettings, accelerator: Any,
              seed: int) -> dict[str, Any]:
    """eval_<grader> scores, eval_seconds, the number of answers and a few samples; on every rank."""
    from accelerate.utils import gather_object

    started = time.time()
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(eval_set.prompts), world))
    answers = generate(model, tokenizer, [eval_set.prompts[i] for i in mine], settings, accelerator.device, seed)
    pairs = list(zip(mine, answers, strict=True))
    if world > 1:
        pairs = gather_object(pairs)
    ordered = [a for _, a in sorted(pairs)]
    scores = grade(settings.graders, ordered, eval_set.expected)
    samples = [{"prompt": q[:SAMPLE_CHARS], "expected": e[:SAMPLE_CHARS], "answer": a[:SAMPLE_CHARS]}
               for q, e, a in list(zip(eval_set.questions, eval_set.expected, ordered, strict=True))[:SAMPLES]]
    return {**scores, "eval_seconds": round(time.time() - started, 3), "eval_examples": len(ordered),
            "samples": samples}
