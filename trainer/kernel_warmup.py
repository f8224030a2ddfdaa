"""`python -m trainer warm-kernels MODEL_DIR...`: compile the fast path's Triton kernels for these
models before a job needs them.

Triton compiles a kernel the first time a process of the host calls it with a new specialization
(the dtypes, the constants, which integer arguments are multiples of 16) and keeps the binary in
its on-disk cache, where every later process finds it. On a host that never ran a job, the first
one paid for about a dozen compilations, seconds between its submission and its first step.

The specializations follow the model's widths (hidden size, MLP width, vocabulary), not its depth
or its weights: a one-layer copy of each model with random weights, given the method and fast path
exactly as a job's (trainer.fastpath.prepare_model), runs one forward and backward under the bf16
autocast a job runs under, then one forward without gradients (an evaluation's variant of the
loss kernel). LoRA and full fine-tuning between them reach every kernel the fast path has. Nothing
is written but Triton's cache.

Triton also specializes a plain integer argument on being 1 or a multiple of 16. Widths aside, one
kernel takes one derived from the batch: liger's RMSNorm backward runs one program per SM, each over
ceil(tokens / SMs) rows, and gets that count as an argument. A batch of a hundred tokens gives 1
where a job's batch of thousands gives neither, and the job compiled it again. So the training pass
runs at token counts that give each of the three (`token_counts`), each a multiple of 32 tokens, so
that the batch's and each row's counts are multiples of 16, as a packed batch's usually are.
"""

from __future__ import annotations

import contextlib
import copy
import time
from pathlib import Path
from typing import Any

import torch

METHODS = ("lora", "full")
ROWS, SEQ = 2, 64  # the batch of a device without SMs to count, and the padded and evaluation passes'


def token_counts(sm_count: int) -> list[int]:
    """Tokens of the training passes: ceil(tokens / sm_count) is 1, a multiple of 16 and neither, in
    turn, with every count a multiple of 32 (see the module's docstring)."""
    if sm_count < 32:
        return [ROWS * SEQ]
    return [sm_count // 32 * 32, 16 * sm_count if sm_count % 2 == 0 else 32 * sm_count, -(-(2 * sm_count + 1) // 32) * 32]


def one_layer(config: Any) -> Any:
    """The model's config with its widths and a single decoder layer."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = 1
    for name in ("layer_types", "mlp_only_layers"):  # per-layer lists some configs keep
        value = getattr(config, name, None)
        if isinstance(value, list) and value:
            setattr(config, name, value[:1])
    return config


def _batch(config: Any, packed: bool, bounds: bool = False, tokens: int = ROWS * SEQ) -> dict[str, torch.Tensor]:
    from trainer import packed_attention
    from trainer.data.batch import collate

    seq = tokens // ROWS
    examples = []
    for _ in range(ROWS):
        ids = torch.randint(0, config.vocab_size, (seq,)).tolist()
        example = {"input_ids": ids, "labels": ids}
        if packed:
            example["position_ids"] = list(range(seq // 2)) * 2
        examples.append(example)
    batch = collate(examples, pad_id=0)
    if bounds:
        batch = packed_attention.with_bounds(batch)
    return batch


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
        # Packed batches (two examples a row, as packing lays them) and a padded one, trained on;
        # then the padded one without gradients, as an evaluation runs.
        passes = [(_batch(config, packed=True, bounds=packed, tokens=n), True) for n in token_counts(sms)]
        passes += [(_batch(config, packed=False), True), (_batch(config, packed=False), False)]
        for batch, grad in passes:
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
