"""Memory and compute planner: will a fine-tuning job fit on the GPUs, and how long will it take.

The API calls `plan()` when a job is submitted, before any GPU is touched, so everything here
works from a transformers config alone: the model is built on the meta device to count its
parameters exactly, and memory is predicted from what the trainer's code actually keeps alive.

What is modelled (one training micro-step on one GPU, in bytes):

- weights: bf16 base weights (2 B/param); QLoRA stores decoder linears as NF4 with double
  quantisation; LoRA adapters are fp32 because peft upcasts bf16 adapters by default.
- gradients: one per trainable parameter, in the parameter's dtype.
- optimizer: AdamW's m and v. `adamw` plans them in fp32 (8 B/param, the conservative mixed
  precision recipe); `adamw_torch` plans what torch.optim.AdamW really allocates, `zeros_like(p)`,
  i.e. 4 B/param for bf16 params; `adamw_fused` (torch's fused kernel) allocates the same;
  `adamw_8bit` is bitsandbytes' 8-bit AdamW (2 B/param); `paged_adamw` (fp32 m and v, 8 B/param)
  and `paged_adamw_8bit` (2 B/param) keep them in paged memory, planned as resident on the GPU:
  the driver moves pages to the host only under pressure, which a plan must not count on.
- activations: the tensors autograd saves, derived op by op below for a Llama decoder layer.
- logits: bf16 logits, the fp32 upcast in the loss, log_softmax's saved output and its gradient;
  with a 128k vocabulary these dominate everything else at long sequences.
- overhead: small buffers (ids, labels, rotary tables, masks, cuBLAS workspace, NF4 dequant
  scratch) and allocator fragmentation.

Peak memory is the larger of two moments of a step: the start of backward (all activations plus
the logits' backward buffers, few gradients yet, because zero_grad(set_to_none=True) freed them)
and the end of backward (all gradients, one layer's activations). Between the two, memory moves
roughly linearly layer by layer, so the peak is at one end.

`allocated` is what torch.cuda.max_memory_allocated reports; `total` adds fragmentation and is
what must fit. The CUDA context (~0.5 GiB) is outside both; the fit margin absorbs it.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

GiB = 1024**3

Method = Literal["full", "lora", "qlora"]
Optimizer = Literal["adamw", "adamw_torch", "adamw_fused", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"]
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw_torch", "adamw_fused", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")
# JobSpec.optimizer -> the name here: the spec's "adamw" is torch's AdamW, what `adamw_torch` plans.
SPEC_OPTIMIZERS = {"adamw": "adamw_torch", "adamw_fused": "adamw_fused", "adamw_8bit": "adamw_8bit",
                   "paged_adamw": "paged_adamw", "paged_adamw_8bit": "paged_adamw_8bit"}
Strategy = Literal["ddp", "fsdp"]
FullPrecision = Literal["bf16", "fp32_master"]
Precision = Literal["bf16", "fp32"]

METHODS: tuple[str, ...] = ("full", "lora", "qlora")

# Measured bf16 dense matmul throughput of the lent H200 (FLOP/s), and the share of it a
# fine-tuning step reaches end to end (attention, norms, optimizer, data and Python overhead).
H200_BF16_PEAK_FLOPS = 790e12
DEFAULT_EFFICIENCY = 0.35

# The caching allocator rounds and splits blocks, so reserved memory (what hits the OOM) runs
# above the allocated peak. On the H200 (bench/results/plan_accuracy.md) reserved/allocated was
# 1.00-1.10 for most cells, 1.15 for QLoRA at batch 4, and 1.06-1.26 for full fine-tuning with
# checkpointing, whose recomputed layers interleave with growing gradients.
DEFAULT_FRAGMENTATION = 0.10
FULL_CHECKPOINTED_FRAGMENTATION = 0.15
# cuBLAS/cuBLASLt workspaces and other small library buffers that go through the allocator.
LIBRARY_WORKSPACE_BYTES = 64 * 1024**2
DEFAULT_MARGIN = 0.10

# NF4 with double quantisation: 4 bits per weight, one 8-bit absmax per block of 64 weights,
# one fp32 scale per 256 absmax blocks, plus a 256-entry fp32 code table per quantised tensor.
NF4_BLOCK = 64
NF4_BLOCKS_PER_SCALE = 256
NF4_CODE_BYTES = 256 * 4 + 16 * 4


# --------------------------------------------------------------------------------------------
# Model shape
# --------------------------------------------------------------------------------------------

# Where a decoder layer's linear layers take their input from; linears in one group read the same
# tensor, so that tensor is saved once no matter how many of them need it.
ATTN_IN, ATTN_OUT, MLP_IN, MLP_MID = "attn_in", "attn_out", "mlp_in", "mlp_mid"


@dataclass(frozen=True)
class Linear:
    name: str  # full module name, e.g. "model.layers.3.self_attn.q_proj"
    in_features: int
    out_features: int
    bias: bool
    layer: int | None  # decoder layer index, None outside the layer stack (e.g. lm_head)

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class Shape:
    """What the planner needs to know about a causal LM, counted from a meta-device model."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    gated_mlp: bool
    total_params: int  # unique parameters (a tied matrix counts once)
    embedding_params: int  # input embedding(s)
    lm_head_params: int  # 0 when tied to the input embedding
    norm_params: int
    layer_params: int  # one decoder layer, the largest
    linears: tuple[Linear, ...] = field(repr=False)
    embeddings: tuple[tuple[str, int, int], ...] = field(repr=False)  # (name, num, dim)
    output_embedding: str | None = None
    # suffix within a layer (e.g. "self_attn.q_proj") -> input group (ATTN_IN, ...)
    groups: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @property
    def decoder_linear_params(self) -> int:
        return sum(m.params for m in self.linears if m.layer is not None)

    @property
    def matmul_params(self) -> int:
        """Weights that take part in a matmul per token: decoder linears and the LM head.

        A tied LM head is the embedding matrix, so it counts here although it counts once in
        total_params; embedding lookups cost no FLOPs.
        """
        head = self.vocab * self.hidden
        return sum(m.in_features * m.out_features for m in self.linears if m.layer is not None) + head

    def group_of(self, linear: Linear) -> str | None:
        if linear.layer is None:
            return None
        return dict(self.groups).get(_layer_suffix(linear.name))

    def lora_targets(self, targets: str | list[str] | tuple[str, ...] = "all-linear") -> list[str]:
        """Module names peft adapts for these target_modules, by peft's own matching rules."""
        linear_names = [m.name for m in self.linears]
        if isinstance(targets, str) and targets.lower() == "all-linear":
            # peft: every Linear/Conv1D except the output embedding (the LM head).
            return [n for n in linear_names if n != self.output_embedding]
        candidates = linear_names + [name for name, _, _ in self.embeddings]
        if isinstance(targets, str):
            return [n for n in candidates if re.fullmatch(targets, n)]
        wanted = list(targets)
        return [n for n in candidates if n in wanted or any(n.endswith("." + t) for t in wanted)]

    def lora_params(self, r: int, targets: str | list[str] | tuple[str, ...] = "all-linear") -> int:
        """Trainable parameters peft creates: r*(in+out) per adapted linear, r*(num+dim) per
        adapted embedding (no LoRA bias, no DoRA)."""
        chosen = set(self.lora_targets(targets))
        n = sum(r * (m.in_features + m.out_features) for m in self.linears if m.name in chosen)
        n += sum(r * (num + dim) for name, num, dim in self.embeddings if name in chosen)
        return n

    def to_dict(self) -> dict[str, Any]:
        per_suffix: dict[str, dict[str, int]] = {}
        for m in self.linears:
            key = _layer_suffix(m.name) if m.layer is not None else m.name
            entry = per_suffix.setdefault(
                key, {"in_features": m.in_features, "out_features": m.out_features, "count": 0, "params": 0}
            )
            entry["count"] += 1
            entry["params"] += m.params
        d = {k: v for k, v in asdict(self).items() if k not in ("linears", "embeddings", "groups")}
        d["linear_modules"] = per_suffix
        d["decoder_linear_params"] = self.decoder_linear_params
        return d


_LAYER_RE = re.compile(r"^(.*?\.)?(layers|h|blocks|block|decoder_layers)\.(\d+)\.(.+)$")


def _layer_suffix(name: str) -> str:
    m = _LAYER_RE.match(name)
    return m.group(4) if m else name


def _layer_index(name: str) -> int | None:
    m = _LAYER_RE.match(name)
    return int(m.group(3)) if m else None


def _as_config(config: Any):
    """A transformers config from a config object, a config.json mapping, or a model directory."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    if isinstance(config, Mapping):
        d = dict(config)
        model_type = d.pop("model_type", "llama")
        return AutoConfig.for_model(model_type, **d)
    if isinstance(config, (str, Path)):
        p = Path(config)
        if p.is_file():
            return _as_config(json.loads(p.read_text()))
        return AutoConfig.from_pretrained(str(p), local_files_only=True)
    raise TypeError(f"config: expected a transformers config, a mapping or a path, not {type(config).__name__}")


def _group_for(suffix: str, lin: Linear, hidden: int, ffn: int) -> str:
    """Which tensor a decoder linear reads, from its name first and its widths second."""
    leaf = suffix.rsplit(".", 1)[-1].lower()
    if leaf in ("down_proj", "fc2", "w2", "dense_4h_to_h") or lin.in_features == ffn != hidden:
        return MLP_MID
    if leaf in ("gate_proj", "up_proj", "gate_up_proj", "fc1", "w1", "w3", "c_fc", "dense_h_to_4h"):
        return MLP_IN
    if lin.out_features in (ffn, 2 * ffn) and ffn != hidden:
        return MLP_IN
    if leaf in ("o_proj", "out_proj", "dense") or (leaf == "c_proj" and "attn" in suffix):
        return ATTN_OUT
    return ATTN_IN


def model_shape(config: Any) -> Shape:
    """Count a causal LM's parameters exactly from its config (meta device, no weights)."""
    cfg = _as_config(config)
    key = cfg.to_json_string(use_diff=False)
    return _model_shape_cached(key, type(cfg).__module__, type(cfg).__qualname__)


@functools.lru_cache(maxsize=64)
def _model_shape_cached(config_json: str, cfg_module: str, cfg_qualname: str) -> Shape:
    import importlib

    import torch
    from transformers import AutoModelForCausalLM

    cfg_cls = importlib.import_module(cfg_module)
    for part in cfg_qualname.split("."):
        cfg_cls = getattr(cfg_cls, part)
    cfg = cfg_cls.from_dict(json.loads(config_json))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)

    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    hidden = int(text.hidden_size)
    layers = int(text.num_hidden_layers)
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    ffn = int(getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden)
    vocab = int(text.vocab_size)

    out_emb = model.get_output_embeddings()
    in_emb = model.get_input_embeddings()
    tied = out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight

    linears: list[Linear] = []
    embeddings: list[tuple[str, int, int]] = []
    output_name = None
    for name, mod in model.named_modules():
        if out_emb is not None and mod is out_emb:
            output_name = name
        if isinstance(mod, torch.nn.Linear):
            linears.append(Linear(name, mod.in_features, mod.out_features, mod.bias is not None, _layer_index(name)))
        elif type(mod).__name__ == "Conv1D":  # GPT-2 style: weight is (in, out)
            w = mod.weight
            linears.append(Linear(name, int(w.shape[0]), int(w.shape[1]), True, _layer_index(name)))
        elif isinstance(mod, torch.nn.Embedding):
            embeddings.append((name, mod.num_embeddings, mod.embedding_dim))

    seen: set[int] = set()
    total = emb = head = norms = 0
    per_layer: dict[int, int] = {}
    emb_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        idx = _layer_index(name)
        if idx is not None:
            per_layer[idx] = per_layer.get(idx, 0) + n
        if id(p) in emb_ids:
            emb += n
        elif output_name is not None and name.startswith(output_name + "."):
            head += n
        elif p.dim() == 1 and "norm" in name.lower():
            norms += n

    layer0 = [m for m in linears if m.layer == 0]
    groups = tuple((_layer_suffix(m.name), _group_for(_layer_suffix(m.name), m, hidden, ffn)) for m in layer0)
    gated = sum(1 for _, g in groups if g == MLP_IN) >= 2 or any(s.endswith("gate_up_proj") for s, _ in groups)
    return Shape(
        model_type=str(getattr(cfg, "model_type", "unknown")),
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        ffn=ffn,
        vocab=vocab,
        tied=tied,
        gated_mlp=gated,
        total_params=total,
        embedding_params=emb,
        lm_head_params=head,
        norm_params=norms,
        layer_params=max(per_layer.values(), default=0),
        linears=tuple(linears),
        embeddings=tuple(embeddings),
        output_embedding=output_name,
        groups=groups,
    )


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak GPU memory of one training step, per GPU, in bytes.

    weights + gradients + optimizer + activations + logits + overhead == total. The gradient,
    activation and logits terms are those alive at the peak moment (`peak_at`); `parts` itemises
    every term, including the ones that are not at their largest at the peak.
    """

    method: str
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    optimizer: str
    gpus: int
    strategy: str
    full_precision: str
    trainable_params: int
    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    logits: int
    overhead: int
    allocated: int  # what torch.cuda.max_memory_allocated should report
    total: int  # allocated plus fragmentation: what has to fit
    peak_at: str  # "backward_start" or "backward_end"
    parts: dict[str, int]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_gib"] = round(self.total / GiB, 3)
        d["allocated_gib"] = round(self.allocated / GiB, 3)
        return d


@dataclass(frozen=True)
class _Lora:
    r: int
    dropout: float
    adapter_bytes: int  # peft upcasts bf16 adapters to fp32
    modules: frozenset[str]
    # peft's bnb Linear4bit skips the fp32 input cast under autocast; its plain Linear does not.
    quantized: bool = False


def _weight_bytes(shape: Shape, method: str, base_bytes: int, lora: _Lora | None) -> tuple[int, dict[str, int]]:
    if method != "qlora":
        base = shape.total_params * base_bytes
        parts = {"base_weights": base}
    else:
        # bitsandbytes quantises every decoder linear; embeddings, the LM head and norms stay bf16.
        quant = 0
        q_params = 0
        for m in shape.linears:
            if m.layer is None:
                continue
            n = m.in_features * m.out_features
            q_params += n
            blocks = math.ceil(n / NF4_BLOCK)
            quant += math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / NF4_BLOCKS_PER_SCALE) + NF4_CODE_BYTES
            if m.bias:
                quant += m.out_features * base_bytes
        rest = (shape.total_params - q_params - sum(m.out_features for m in shape.linears if m.layer is not None and m.bias)) * base_bytes
        parts = {"nf4_linears": quant, "bf16_rest": rest}
        base = quant + rest
    adapters = 0
    if lora is not None:
        adapters = _lora_params(shape, lora) * lora.adapter_bytes
        parts["adapters"] = adapters
    return base + adapters, parts


def _lora_params(shape: Shape, lora: _Lora) -> int:
    n = sum(lora.r * (m.in_features + m.out_features) for m in shape.linears if m.name in lora.modules)
    n += sum(lora.r * (num + dim) for name, num, dim in shape.embeddings if name in lora.modules)
    return n


def layer_activation_bytes_per_token(
    shape: Shape,
    *,
    act_bytes: int = 2,
    residual_bytes: int | None = None,
    base_trainable: bool = False,
    lora: _Lora | None = None,
    padded: bool = False,
    seq_len: int = 0,
    autocast: bool = False,
) -> dict[str, float]:
    """Bytes autograd saves per token in one decoder layer, itemised.

    Walk of a Llama layer (h hidden, a = activation bytes, n heads of d, g kv heads, f ffn):

      x ─ RMSNorm ─ q,k,v ─ RoPE ─ sdpa ─ o ─ (+x) ─ RMSNorm ─ gate,up ─ SiLU·up ─ down ─ (+)

    * RMSNorm computes in fp32: `x.float()`, `pow(2)` saves that fp32 copy and `* rsqrt` saves it
      again (same storage): 4h. `weight * x_norm.to(bf16)` saves x_norm (a·h) only when the norm
      weight trains (full fine-tuning). With fp32 master weights the residual stream is fp32
      and the normalised output is fp32 too.
    * A linear saves its input only when its weight trains. q,k,v share one input, gate and up
      share one, so each shared input is saved once: a·h (attn_in), a·h (mlp_in), a·f (down's
      input). o_proj's input is sdpa's output, which sdpa saves anyway.
    * RoPE multiplies by cos/sin, which need no gradient, so it saves only the shared tables.
    * sdpa (flash / efficient kernels) saves q (a·n·d), k and v (a·g·d each), the output (a·n·d)
      and the fp32 logsumexp (4n). With a padding mask transformers repeats k and v to n heads
      (a·n·d each) and torch turns the bool mask into a float bias it saves: a·S per token.
    * Gated MLP: SiLU saves its input gate (a·f), the product saves both factors (a·f each).
    * peft LoRA with fp32 adapters casts each adapted module's input to fp32 separately, and
      lora_A saves that copy: 4·in per adapted module (no sharing across q,k,v), plus lora_B
      saves lora_A's output (4r). With dropout > 0 lora_A saves the dropped copy instead and
      dropout keeps a 1-byte mask: 4·in + 1·in.
      Under bf16 autocast (accelerate mixed_precision="bf16") lora_A casts that fp32 copy back to
      bf16 and saves the cast instead: 2·in per module, 2r for lora_B. peft's 4-bit layer skips
      the fp32 cast under autocast, so lora_A saves the shared bf16 input: a·in once per group.
    * Residual adds save nothing.

    * rsqrt's fp32 output: 4 bytes per token per norm.

    Llama full fine-tuning, bf16, no padding: 2·(4h + 4 + 2h) + 2h + 2h + (2h + 4g·d + 2h + 4n) + 8f
                                            = 20h + 4·g·d + 8f + 4n + 8 bytes.
    These terms match, byte for byte, the tensors autograd saves for a bf16 Llama layer on CPU
    (tests/unit/test_planner.py counts them with saved_tensors_hooks).
    """
    a = act_bytes
    rb = residual_bytes if residual_bytes is not None else a
    h, n, g, d, f = shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.ffn
    attn_w = n * d
    widths = {ATTN_IN: h, ATTN_OUT: attn_w, MLP_IN: h, MLP_MID: f}
    out: dict[str, float] = {}

    # + 4 bytes: rsqrt's fp32 output, one per token.
    norm_fp32 = 4 * h + 4
    norm_out = rb * h if base_trainable else 0
    out["norms"] = 2 * (norm_fp32 + norm_out)

    # Which layer-0 suffixes are adapted; every layer is assumed to be adapted alike.
    adapted: dict[str, list[str]] = {}
    if lora is not None:
        layer0 = {_layer_suffix(m.name) for m in shape.linears if m.layer == 0 and m.name in lora.modules}
        for suffix, grp in shape.groups:
            if suffix in layer0:
                adapted.setdefault(grp, []).append(suffix)

    group_members: dict[str, int] = {}
    for _, grp in shape.groups:
        group_members[grp] = group_members.get(grp, 0) + 1

    linear_inputs = 0.0
    lora_saved = 0.0
    for grp, w in widths.items():
        if grp not in group_members:
            continue
        # Under autocast (fp32 master) the linear casts its fp32 input to bf16 and saves the cast.
        saved_by_base = base_trainable and grp != ATTN_OUT
        if saved_by_base:
            linear_inputs += a * w
        for _ in adapted.get(grp, []):
            if lora is None:
                break
            # dtype lora_A computes in, and whether it gets its own copy of the input.
            compute = a if autocast else lora.adapter_bytes
            own_copy = compute != a or (autocast and not lora.quantized and lora.adapter_bytes != a)
            if lora.dropout > 0:
                lora_saved += compute * w + w
            elif own_copy:
                lora_saved += compute * w
            elif not saved_by_base and grp != ATTN_OUT:
                # lora_A saves the very input tensor, shared by the group.
                lora_saved += a * w
                saved_by_base = True
            lora_saved += compute * lora.r
    out["linear_inputs"] = linear_inputs
    out["lora"] = lora_saved

    kv_saved = (2 * a * n * d) if (padded and g != n) else (2 * a * g * d)
    out["attention"] = a * attn_w + kv_saved + a * attn_w + 4 * n + (a * seq_len if padded else 0)
    if shape.gated_mlp:
        out["mlp"] = 3 * a * f
    else:
        out["mlp"] = a * f  # activation input; its output is down's input (counted above)
    out["total"] = sum(out.values())
    return out


def _backward_transient_per_token(shape: Shape, a: int, lora: _Lora | None) -> float:
    """Gradient buffers alive while one layer runs backward (MLP side, the widest): the incoming
    and outgoing hidden-state grads and up to three ffn-wide grads at once; LoRA's fp32 branch
    adds an fp32 grad of its input."""
    h, f = shape.hidden, shape.ffn
    t = a * (3 * f + 3 * h)
    if lora is not None:
        t += lora.adapter_bytes * (f + h)
    return t


def estimate_memory(
    config: Any,
    *,
    method: Method,
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool = False,
    optimizer: Optimizer = "adamw",
    lora_r: int = 16,
    lora_targets: str | list[str] = "all-linear",
    lora_dropout: float = 0.0,
    gpus: int = 1,
    strategy: Strategy = "ddp",
    full_precision: FullPrecision = "bf16",
    precision: Precision = "bf16",
    gradient_accumulation_steps: int = 1,
    padded: bool = True,
    autocast: bool = False,
    fragmentation: float | None = None,
) -> MemoryEstimate:
    """Peak memory per GPU of training `config` with `method` (see the module docstring).

    padded: batches carry a padding mask (the trainer pads to the longest example), which makes
    transformers repeat k/v heads and torch keep a float attention bias per layer. A batch
    without padding runs flash attention with no mask.
    autocast: the step runs under bf16 autocast (accelerate mixed_precision="bf16"); this
    shrinks LoRA's saved inputs (bf16 instead of fp32 copies). fp32-master full fine-tuning
    always assumes autocast.
    """
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    if batch_size < 1 or seq_len < 1 or gpus < 1:
        raise ValueError("batch_size, seq_len and gpus must be at least 1")
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy: {strategy!r} is not 'ddp' or 'fsdp'")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    shape = config if isinstance(config, Shape) else model_shape(config)
    notes: list[str] = []

    a = 4 if precision == "fp32" else 2  # activation / frozen-weight dtype
    fp32_master = method == "full" and full_precision == "fp32_master" and precision != "fp32"
    lora = None
    if method in ("lora", "qlora"):
        modules = frozenset(shape.lora_targets(lora_targets))
        if not modules:
            raise ValueError(f"lora_targets: {lora_targets!r} matches no module of this model")
        lora = _Lora(r=lora_r, dropout=lora_dropout, adapter_bytes=4, modules=modules, quantized=method == "qlora")

    # --- parameters, gradients, optimizer -------------------------------------------------
    if method == "full":
        param_bytes = 4 if (fp32_master or precision == "fp32") else 2
        trainable = shape.total_params
        weights = shape.total_params * param_bytes
        weight_parts = {"base_weights": weights}
        grad_bytes = param_bytes
    else:
        weights, weight_parts = _weight_bytes(shape, method, a, lora)
        trainable = _lora_params(shape, lora)
        param_bytes = grad_bytes = lora.adapter_bytes
    grads = trainable * grad_bytes
    state_bytes = {"adamw": 8, "adamw_torch": 2 * param_bytes, "adamw_fused": 2 * param_bytes, "adamw_8bit": 2,
                   "paged_adamw": 8, "paged_adamw_8bit": 2}[optimizer]
    opt = trainable * state_bytes
    if optimizer.startswith("paged_"):
        notes.append("paged optimizer states are planned as resident; under pressure they move to host memory")
    if optimizer in ("adamw_torch", "adamw_fused") and method == "full" and param_bytes == 2:
        notes.append("torch AdamW keeps m and v in the parameters' dtype: bf16 here")

    # --- sharding / replication ----------------------------------------------------------
    extra_static = 0
    if gpus > 1 and strategy == "fsdp":
        layer_w = shape.layer_params * (param_bytes if method == "full" else a)
        root_w = (shape.embedding_params + shape.lm_head_params) * (param_bytes if method == "full" else a)
        gathered = max(layer_w, root_w)
        weights = math.ceil(weights / gpus) + gathered
        weight_parts["fsdp_gathered_unit"] = gathered
        grads_sharded = math.ceil(grads / gpus)
        # Each unit's full gradient exists until it is reduce-scattered.
        unit_grad = min(grads, shape.layer_params * grad_bytes if method == "full" else grads)
        grads = grads_sharded + unit_grad
        opt = math.ceil(opt / gpus)
        notes.append(f"FSDP full shard over {gpus} GPUs: weights, gradients and optimizer divided by {gpus}")
    elif gpus > 1:
        # DDP copies gradients into its all-reduce buckets.
        extra_static = trainable * grad_bytes
        notes.append(f"DDP over {gpus} GPUs: every GPU holds the whole model plus gradient buckets")

    # --- activations ----------------------------------------------------------------------
    tokens = batch_size * seq_len
    per_layer = layer_activation_bytes_per_token(
        shape,
        act_bytes=a,
        residual_bytes=4 if fp32_master else a,
        base_trainable=method == "full",
        lora=lora,
        padded=padded,
        seq_len=seq_len,
        autocast=autocast and a == 2,
    )
    layer_tok = per_layer["total"]
    rb = 4 if fp32_master else a
    if gradient_checkpointing:
        # Non-reentrant checkpointing keeps each layer's input (the residual stream) and
        # recomputes one layer at a time in backward.
        stored = shape.layers * rb * shape.hidden * tokens
        recompute = layer_tok * tokens
    else:
        stored = shape.layers * layer_tok * tokens
        recompute = 0
    # Final norm (fp32 copy, plus its output when the head trains, which the head saves too).
    head_tok = 4 * shape.hidden + 4 + (2 * rb * shape.hidden if method == "full" else 0)
    head_acts = head_tok * tokens
    transient = _backward_transient_per_token(shape, a, lora) * tokens
    # Autocast keeps a bf16 copy of every fp32 weight it casts until backward has used it.
    autocast_cache = 2 * shape.matmul_params if fp32_master else 0
    if lora is not None and autocast and a == 2:
        autocast_cache = 2 * trainable

    # --- logits -------------------------------------------------------------------------
    # bf16 logits (kept by the model output through backward), the fp32 upcast in the loss,
    # log_softmax's saved fp32 output, then in backward its incoming and outgoing fp32 grads.
    # Peak is in log_softmax's backward: a·V + 4V + 4V + 4V per token.
    V = shape.vocab
    logits_peak = (a + 12) * V * tokens
    logits_kept = a * V * tokens

    # --- small things -------------------------------------------------------------------
    small = 2 * 8 * tokens  # input ids and labels (int64)
    small += 2 * 8 * tokens  # shifted labels and the padded copy in the loss
    small += 2 * a * shape.head_dim * tokens  # rotary cos/sin, shared by all layers
    if padded:
        small += batch_size * seq_len * seq_len  # the bool 4D mask
    small += LIBRARY_WORKSPACE_BYTES
    if method == "qlora":
        # bitsandbytes dequantises one weight to bf16 per matmul, forward and backward.
        largest = max((m.in_features * m.out_features for m in shape.linears if m.layer is not None), default=0)
        small += 2 * a * largest

    # --- two candidate peaks ------------------------------------------------------------
    grads_always = grads if gradient_accumulation_steps > 1 else 0
    # Tied full fine-tuning: the LM head's and the embedding's grads meet in one buffer at the end.
    tie_transient = shape.vocab * shape.hidden * grad_bytes if (method == "full" and shape.tied) else 0
    start_acts = stored + head_acts + autocast_cache
    start = start_acts + logits_peak + grads_always
    end_acts = recompute + transient + (0 if gradient_checkpointing else layer_tok * tokens)
    end = grads + logits_kept + end_acts + tie_transient
    if start >= end:
        peak_at, live_grads, live_acts, live_logits = "backward_start", grads_always, start_acts, logits_peak
    else:
        peak_at, live_grads, live_acts, live_logits = "backward_end", grads + tie_transient, end_acts, logits_kept

    live_grads += extra_static
    allocated = weights + live_grads + opt + live_acts + live_logits + small
    if fragmentation is None:
        full_ckpt = method == "full" and gradient_checkpointing
        fragmentation = FULL_CHECKPOINTED_FRAGMENTATION if full_ckpt else DEFAULT_FRAGMENTATION
    frag = int(allocated * fragmentation)
    overhead = small + frag
    total = allocated + frag

    parts = {
        **weight_parts,
        "gradients_all": grads,
        "optimizer_states": opt,
        "ddp_buckets": extra_static,
        "activations_stored": stored,
        "activations_head": head_acts,
        "activations_recompute_layer": recompute,
        "backward_transient": transient,
        "autocast_weight_cache": autocast_cache,
        "logits_peak": logits_peak,
        "logits_kept": logits_kept,
        "tied_grad_transient": tie_transient,
        "small_buffers": small,
        "fragmentation": frag,
        "layer_bytes_per_token": int(layer_tok),
    }
    if gradient_checkpointing is False and layer_tok * tokens * shape.layers > 0.5 * total:
        notes.append("activations dominate: gradient checkpointing would cut them to one layer's worth")
    if logits_peak > 0.3 * total:
        notes.append("logits and the loss's fp32 copies dominate: a shorter max_seq_len or smaller batch helps most")
    return MemoryEstimate(
        method=method,
        batch_size=batch_size,
        seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing,
        optimizer=optimizer,
        gpus=gpus,
        strategy=strategy if gpus > 1 else "single",
        full_precision=full_precision if method == "full" else "n/a",
        trainable_params=trainable,
        weights=int(weights),
        gradients=int(live_grads),
        optimizer_states=int(opt),
        activations=int(live_acts),
        logits=int(live_logits),
        overhead=int(overhead),
        allocated=int(allocated),
        total=int(total),
        peak_at=peak_at,
        parts={k: int(v) for k, v in parts.items()},
        notes=notes,
    )


# --------------------------------------------------------------------------------------------
# Compute
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComputeEstimate:
    method: str
    tokens: int
    seq_len: int
    gpus: int
    flops_per_token: float
    matmul_flops_per_token: float
    attention_flops_per_token: float
    total_flops: float
    peak_flops_per_gpu: float
    efficiency: float
    seconds: float
    gpu_hours: float
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate_compute(
    config: Any,
    *,
    method: Method,
    tokens: int,
    gpus: int = 1,
    seq_len: int = 1024,
    gradient_checkpointing: bool = False,
    lora_r: int = 16,
    lora_targets: str | list[str] = "all-linear",
    peak_tflops: float | None = None,
    efficiency: float | None = None,
) -> ComputeEstimate:
    """Training FLOPs and wall time for `tokens` tokens (padding included).

    Matmul FLOPs per token, N = decoder linear weights + LM head (tied or not):
      full:        6N  (forward 2N, input grads 2N, weight grads 2N)
      lora/qlora:  4N + 6·trainable  (frozen base: forward and input grads only)
    Attention scores and values, per token: 4·L·(n·d)·S forward, three times that with backward,
    halved by the causal mask: 6·L·(n·d)·S. Checkpointing recomputes the forward once more.
    peak_tflops: per GPU, default the measured H200 bf16 matmul peak; efficiency: the fraction of
    it a real step reaches.
    """
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    shape = config if isinstance(config, Shape) else model_shape(config)
    N = shape.matmul_params
    notes: list[str] = []
    if method == "full":
        mm = 6.0 * N
        fwd = 2.0 * N
    else:
        trainable = shape.lora_params(lora_r, lora_targets)
        mm = 4.0 * N + 6.0 * trainable
        fwd = 2.0 * N + 2.0 * trainable
    attn_fwd = 4.0 * shape.layers * shape.heads * shape.head_dim * seq_len * 0.5
    attn = 3.0 * attn_fwd
    if gradient_checkpointing:
        mm += fwd
        attn += attn_fwd
        notes.append("gradient checkpointing recomputes the forward: about a third more FLOPs")
    if method == "qlora":
        notes.append("QLoRA also dequantises every weight twice per step; that time is not in the FLOPs")
    per_token = mm + attn
    total = per_token * tokens
    peak = peak_tflops * 1e12 if peak_tflops is not None else H200_BF16_PEAK_FLOPS
    eff = efficiency if efficiency is not None else DEFAULT_EFFICIENCY
    if not 0 < eff <= 1:
        raise ValueError(f"efficiency: {eff} is outside (0, 1]")
    seconds = total / (gpus * peak * eff)
    return ComputeEstimate(
        method=method,
        tokens=int(tokens),
        seq_len=seq_len,
        gpus=gpus,
        flops_per_token=per_token,
        matmul_flops_per_token=mm,
        attention_flops_per_token=attn,
        total_flops=total,
        peak_flops_per_gpu=peak,
        efficiency=eff,
        seconds=seconds,
        gpu_hours=seconds * gpus / 3600.0,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------

AUTO_BATCH_MAX = 64


@dataclass(frozen=True)
class MethodPlan:
    method: str
    batch_size: int | None  # None: not even batch 1 fits (auto batch)
    fits: bool
    headroom_bytes: int  # usable memory minus the estimate's total; negative when it does not fit
    estimate: MemoryEstimate

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["estimate"] = self.estimate.to_dict()
        return d


@dataclass(frozen=True)
class Plan:
    model: dict[str, Any]
    gpu_memory_bytes: int
    gpus: int
    strategy: str
    margin: float
    usable_bytes: int
    requested_method: str
    requested_batch_size: int | str
    seq_len: int
    gradient_checkpointing: bool
    methods: dict[str, MethodPlan]
    method: str | None  # chosen; None when refused
    batch_size: int | None
    fits: bool
    message: str
    suggestions: list[dict[str, Any]]
    compute: ComputeEstimate | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "gpu_memory_bytes": self.gpu_memory_bytes,
            "gpus": self.gpus,
            "strategy": self.strategy,
            "margin": self.margin,
            "usable_bytes": self.usable_bytes,
            "requested_method": self.requested_method,
            "requested_batch_size": self.requested_batch_size,
            "seq_len": self.seq_len,
            "gradient_checkpointing": self.gradient_checkpointing,
            "methods": {k: v.to_dict() for k, v in self.methods.items()},
            "method": self.method,
            "batch_size": self.batch_size,
            "fits": self.fits,
            "message": self.message,
            "suggestions": self.suggestions,
            "compute": self.compute.to_dict() if self.compute is not None else None,
        }


@dataclass(frozen=True)
class _Job:
    """The planning-relevant fields of a JobSpec (or of a JobSpec-shaped mapping that may say
    method "auto" and batch_size "auto", which JobSpec itself does not accept)."""

    method: str
    batch_size: int | str
    seq_len: int
    gradient_checkpointing: bool
    lora_r: int
    lora_targets: str | list[str]
    lora_dropout: float
    precision: str
    n_epochs: int
    max_steps: int | None
    grad_accum: int


def _get(obj: Any, key: str, default: Any) -> Any:
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _job(spec_like: Any) -> _Job:
    hp = _get(spec_like, "hyperparameters", None)
    lora = _get(spec_like, "lora", None)
    precision = _get(spec_like, "precision", "auto")
    batch = _get(hp, "batch_size", 4)
    if batch is None:
        batch = "auto"
    return _Job(
        method=str(_get(spec_like, "method", "lora")),
        batch_size=batch if batch == "auto" else int(batch),
        seq_len=int(_get(hp, "max_seq_len", 1024)),
        gradient_checkpointing=bool(_get(spec_like, "gradient_checkpointing", False)),
        lora_r=int(_get(lora, "r", 16)),
        lora_targets=_get(lora, "target_modules", "all-linear"),
        lora_dropout=float(_get(lora, "dropout", 0.0)),
        # "auto" means bf16 on any GPU this service plans for.
        precision="fp32" if precision == "fp32" else "bf16",
        n_epochs=int(_get(hp, "n_epochs", 1)),
        max_steps=_get(hp, "max_steps", None),
        grad_accum=int(_get(hp, "gradient_accumulation_steps", 1)),
    )


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def choose_method(methods: Mapping[str, MethodPlan]) -> str | None:
    """For method "auto": full fine-tuning when it fits, else LoRA, else QLoRA, else None."""
    for m in METHODS:
        if m in methods and methods[m].fits:
            return m
    return None


def plan(
    spec_like: Any,
    config: Any,
    gpu_memory_bytes: int,
    gpus: int = 1,
    dataset_tokens: int | None = None,
    *,
    margin: float = DEFAULT_MARGIN,
    strategy: Strategy = "ddp",
    optimizer: Optimizer = "adamw",
    full_precision: FullPrecision = "bf16",
    padded: bool = True,
    autocast: bool = False,
    peak_tflops: float | None = None,
    efficiency: float | None = None,
) -> Plan:
    """Estimate every method for this job on `gpus` GPUs of `gpu_memory_bytes` each, pick one.

    A method fits when its total stays under (1 - margin) of the GPU's memory. With method
    "auto" the first of full, lora, qlora that fits is chosen; with batch_size "auto" (or None)
    each method gets the largest power of two up to 64 that fits. An explicit method that does
    not fit is refused with a message that names what would fit, with numbers.
    """
    if gpu_memory_bytes <= 0:
        raise ValueError("gpu_memory_bytes must be positive")
    if not 0 <= margin < 1:
        raise ValueError(f"margin: {margin} is outside [0, 1)")
    job = _job(spec_like)
    if job.method not in (*METHODS, "auto"):
        raise ValueError(f"method: {job.method!r} is not one of full, lora, qlora, auto")
    shape = config if isinstance(config, Shape) else model_shape(config)
    usable = int(gpu_memory_bytes * (1 - margin))

    def est(method: str, batch: int, *, seq: int | None = None, ckpt: bool | None = None, k: int | None = None,
            strat: str | None = None) -> MemoryEstimate:
        return estimate_memory(
            shape,
            method=method,
            batch_size=batch,
            seq_len=seq or job.seq_len,
            gradient_checkpointing=job.gradient_checkpointing if ckpt is None else ckpt,
            optimizer=optimizer,
            lora_r=job.lora_r,
            lora_targets=job.lora_targets,
            lora_dropout=job.lora_dropout,
            gpus=k or gpus,
            strategy=strat or strategy,
            full_precision=full_precision,
            precision=job.precision,
            gradient_accumulation_steps=job.grad_accum,
            padded=padded,
            autocast=autocast,
        )

    methods: dict[str, MethodPlan] = {}
    for m in METHODS:
        if job.batch_size == "auto":
            chosen_b, e = None, est(m, 1)
            b = AUTO_BATCH_MAX
            while b >= 1:
                e_b = est(m, b)
                if e_b.total <= usable:
                    chosen_b, e = b, e_b
                    break
                b //= 2
            methods[m] = MethodPlan(m, chosen_b, chosen_b is not None, usable - e.total, e)
        else:
            e = est(m, int(job.batch_size))
            methods[m] = MethodPlan(m, int(job.batch_size), e.total <= usable, usable - e.total, e)

    target = job.method
    if target == "auto":
        chosen = choose_method(methods)
    else:
        chosen = target if methods[target].fits else None

    suggestions: list[dict[str, Any]] = []
    if chosen is not None:
        mp = methods[chosen]
        message = (
            f"{chosen} fits: {_gib(mp.estimate.total)} per GPU of {_gib(usable)} usable "
            f"({_gib(gpu_memory_bytes)} less {margin:.0%} headroom) at batch_size {mp.batch_size}, "
            f"max_seq_len {job.seq_len}"
        )
    else:
        focus = target if target != "auto" else "qlora"
        batch = 1 if job.batch_size == "auto" else int(job.batch_size)
        need = methods[focus].estimate.total
        suggestions = _suggest(est, focus, batch, job, usable, gpus, methods, shape)
        what = (
            f"{focus} fine-tuning"
            if target != "auto"
            else "no method (full, lora or qlora)"
        )
        message = (
            f"{what} of this {shape.total_params / 1e9:.2f}B-parameter model does not fit: "
            f"{focus} needs {_gib(need)} per GPU at batch_size {batch}, max_seq_len {job.seq_len}, "
            f"gradient_checkpointing {str(job.gradient_checkpointing).lower()}; "
            f"usable is {_gib(usable)} ({_gib(gpu_memory_bytes)} less {margin:.0%} headroom)."
        )
        if suggestions:
            message += " What would fit: " + "; ".join(s["text"] for s in suggestions) + "."
        else:
            message += " Nothing within reach fits: use a GPU with more memory or a smaller model."

    compute = None
    if dataset_tokens is not None and chosen is not None:
        tokens = dataset_tokens * job.n_epochs
        if job.max_steps is not None:
            tokens = job.max_steps * job.grad_accum * gpus * (methods[chosen].batch_size or 1) * job.seq_len
        compute = estimate_compute(
            shape,
            method=chosen,
            tokens=tokens,
            gpus=gpus,
            seq_len=job.seq_len,
            gradient_checkpointing=job.gradient_checkpointing,
            lora_r=job.lora_r,
            lora_targets=job.lora_targets,
            peak_tflops=peak_tflops,
            efficiency=efficiency,
        )

    return Plan(
        model={
            "model_type": shape.model_type,
            "params": shape.total_params,
            "layers": shape.layers,
            "hidden": shape.hidden,
            "vocab": shape.vocab,
            "tied": shape.tied,
        },
        gpu_memory_bytes=int(gpu_memory_bytes),
        gpus=gpus,
        strategy=strategy if gpus > 1 else "single",
        margin=margin,
        usable_bytes=usable,
        requested_method=job.method,
        requested_batch_size=job.batch_size,
        seq_len=job.seq_len,
        gradient_checkpointing=job.gradient_checkpointing,
        methods=methods,
        method=chosen,
        batch_size=methods[chosen].batch_size if chosen else None,
        fits=chosen is not None,
        message=message,
        suggestions=suggestions,
        compute=compute,
    )


def _suggest(est, method: str, batch: int, job: _Job, usable: int, gpus: int,
             methods: Mapping[str, MethodPlan], shape: Shape) -> list[dict[str, Any]]:
    """Single changes to the job that would make it fit, each with its estimate."""
    out: list[dict[str, Any]] = []

    def add(kind: str, value: Any, e: MemoryEstimate, text: str) -> None:
        out.append({"change": kind, "value": value, "total_bytes": e.total, "text": f"{text} ({_gib(e.total)})"})

    if not job.gradient_checkpointing:
        e = est(method, batch, ckpt=True)
        if e.total <= usable:
            add("gradient_checkpointing", True, e, "gradient_checkpointing true")
    b = batch // 2
    while b >= 1:
        e = est(method, b)
        if e.total <= usable:
            add("batch_size", b, e, f"batch_size {b}")
            break
        b //= 2
    # Longest max_seq_len (a multiple of 64) that fits at this batch size, by bisection.
    lo, hi = 0, job.seq_len - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if est(method, batch, seq=max(8, mid // 64 * 64 or mid)).total <= usable:
            lo = mid
        else:
            hi = mid - 1
    if lo >= 8:
        s = lo // 64 * 64 or lo
        add("max_seq_len", s, est(method, batch, seq=s), f"max_seq_len {s}")
    for k in (2, 4, 8, 16, 32, 64):
        if k <= gpus:
            continue
        e = est(method, batch, k=k, strat="fsdp")
        if e.total <= usable:
            add("gpus", k, e, f"{k} GPUs with FSDP full sharding")
            break
    for m in METHODS[METHODS.index(method) + 1:]:
        e = est(m, batch)
        if e.total <= usable:
            add("method", m, e, f"method {m}")
            break
    if not out and not job.gradient_checkpointing:
        # Nothing single fits: try the strongest combination we can offer.
        e = est("qlora", 1, ckpt=True)
        if e.total <= usable:
            add("combination", {"method": "qlora", "batch_size": 1, "gradient_checkpointing": True}, e,
                "method qlora with batch_size 1 and gradient_checkpointing true")
    return out
