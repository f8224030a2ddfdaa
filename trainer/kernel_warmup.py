"""`python -m trainer warm-kernels MODEL_DIR...`: compile the fast path's Triton kernels for these
models before a job needs them.

Triton compiles a kernel the first time a process of the host calls it with a new specialization
(the dtypes, the constants, which integer arguments are multiples of 16) and keeps the binary in
its on-disk cache, where every later process finds it. On a host that never ran a job, the first
one paid for about a dozen compilations, seconds between its submission and its first step.

The specializations follow the model's widths (hidden size, MLP width, vocabulary), not its depth
or its weights: a one-layer copy of each model with random weights, given the method and fast path
exactly as a job's (trainer.fastpath.prepare_model), runs a few training passes (forward and
backward) under the bf16 autocast a job runs under, then one forward without gradients (an
evaluation's variant of the loss kernel). LoRA and full fine-tuning between them reach every kernel
the fast path has. Nothing is written but Triton's cache.

Triton also specializes a plain integer argument on being 1 or a multiple of 16, and liger takes a
few shapes of the batch, not only widths:
- its RMSNorm backward runs one program per SM, each over ceil(tokens / SMs) rows, and gets that
  count and the batch's tokens as arguments: a batch of a hundred tokens gives 1 where a job's
  batch of thousands gives neither, and the job compiled it again. The packed training passes run
  at token counts that give each of the three (`token_counts`), each once with rows whose length
  is a multiple of 16 and once with rows a token shorter, whose token count is not a multiple of 16.
- its RoPE kernel takes the batch's rows and its cos table's rows as compile-time constants (the
  batch's rows when packed rows carry their own positions, one when padded rows share them) and
  the row length as a plain integer. The passes run at the spec's default batch size, packed and
  padded, at row lengths that are multiples of 16 and ones that are not. A job of another batch
  size compiles its RoPE kernels (forward and backward) before its first step.
"""

from __future__ import annotations

import contextlib
import copy
import time
from pathlib import Path
from typing import Any

import torch

METHODS = ("lora", "full")
SEQ = 64  # the padded and evaluation passes' row length (a multiple of 16)
ODD_SEQ = 24  # a row length that is not
MULTIPLE = 16  # Triton compiles an integer argument apart when it is a multiple of this


def default_rows() -> int:
    """The batch's rows that most jobs run at: the spec's default batch size."""
    from trainer.spec import Hyperparameters

    return int(Hyperparameters.model_fields["batch_size"].default)


def token_counts(sm_count: int, rows: int) -> list[int]:
    """Tokens of the packed training passes: ceil(tokens / sm_count) is 1, a multiple of 16 and
    neither, in turn; each count is a multiple of 16 x rows, so that every row's length is a
    multiple of 16, as a full packed row's usually is (see the module's docstring). A GPU with
    fewer SMs than one such step gets a single count."""
    step = MULTIPLE * rows
    if sm_count < step:
        return [rows * SEQ]
    return [sm_count // step * step, step * sm_count, -(-(2 * sm_count + 1) // step) * step]


def one_layer(config: Any) -> Any:
    """The model's config with its widths and a single decoder layer."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = 1
    for name in ("layer_types", "mlp_only_layers"):  # per-layer lists some configs keep
        value = getattr(config, name, None)
        if isinstance(value, list) and value:
            setattr(config, name, value[:1])
    return config


def _batch(config: Any, packed: bool, rows: int, seq: int, bounds: bool = False) -> dict[str, torch.Tensor]:
    """`rows` random rows of `seq` tokens; packed rows hold two examples each, as packing lays them."""
    from trainer import packed_attention
    from trainer.data.batch import collate

    examples = []
    for _ in range(rows):
        ids = torch.randint(0, config.vocab_size, (seq,)).tolist()
        example = {"input_ids": ids, "labels": ids}
        if packed:
            half = seq // 2
            example["position_ids"] = list(range(half)) + list(range(seq - half))
        examples.append(example)
    batch = collate(examples, pad_id=0)
    if bounds:
        batch = packed_attention.with_bounds(batch)
    return batch


def passes(config: Any, sms: int, rows: int, bounds: bool) -> list[tuple[dict[str, torch.Tensor], bool]]:
    """(batch, trained) for each pass: packed rows at each of `token_counts`, at that length and a
    token shorter (ceil(tokens / SMs) stays in its class: the counts sit at least a row's worth of
    tokens inside it), padded rows at a length that is a multiple of 16 and one that is not, then
    a padded batch without gradients, as an evaluation runs."""
    lengths = [length for n in token_counts(sms, rows) for length in (n // rows, n // rows - 1)]
    packed = [(_batch(config, True, rows, length, bounds), True) for length in lengths]
    padded = [(_batch(config, False, rows, seq), True) for seq in (SEQ, ODD_SEQ)]
    return packed + padded + [(_batch(config, False, rows, SEQ), False)]


def warm_model(model_dir: str, device: torch.device, methods: tuple[str, ...] = METHODS) -> dict[str, Any]:
    """Run each method's fast path once on a one-layer copy of the model; the seconds each took."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer import packed_attention
    from trainer.fastpath import prepare_model
    from trainer.spec import JobSpec

    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json")
    config = one_layer(AutoConfig.from_pretrained(model_dir))
    precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    took: dict[str, Any] = {}
    for method in methods:
        began = time.monotonic()
        spec = JobSpec(model=model_dir, method=method, training_file="-", speed="fast", precision=precision,
                       **({"full_precision": "bf16"} if method == "full" else {}))
        with torch.device(device):
            base = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        base.config.use_cache = False
        model, fast = prepare_model(base, spec, precision, device)
        model.train()
        packed = packed_attention.available(device) and packed_attention.install(model)
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                    else contextlib.nullcontext())
        rows = default_rows()
        for batch, grad in passes(config, sms, rows, bounds=packed):
            with torch.set_grad_enabled(grad), autocast:
                loss = fast.loss(model, batch, device)[0]
            if grad:
                loss.float().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        del model, base, loss
        if device.type == "cuda":
            torch.cuda.empty_cache()
        took[method] = round(time.monotonic() - began, 3)
    return took


def warm(model_dirs: list[str]) -> dict[str, Any]:
    """Every model in turn; a model that cannot be warmed (no config, an architecture the fast path
    cannot drive, too large for the GPU's free memory) is reported and skipped: its first job then
    compiles its kernels itself, as before."""
    from trainer.startup import kernel_cache_added, kernel_cache_entries

    before = kernel_cache_entries()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    report: dict[str, Any] = {"device": str(device), "models": {}}
    for model_dir in model_dirs:
        try:
            report["models"][model_dir] = warm_model(model_dir, device)
        except Exception as exc:  # noqa: BLE001 - a warm-up that fails only leaves the work to the job
            report["models"][model_dir] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    report["kernel_cache_added"] = kernel_cache_added(before)
    return report
