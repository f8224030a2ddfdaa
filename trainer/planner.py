"""Memory and compute planner: will a fine-tuning job fit on the GPUs, and how long will it take.

The API calls `plan()` when a job is submitted, before any GPU is touched, so everything here
works from a transformers config alone: the model is built on the meta device to count its
parameters exactly, and memory is predicted from what the trainer's code actually keeps alive.

The trainer modelled is `python -m trainer run` (trainer/loop.py under accelerate): bf16 mixed
precision through accelerate, which runs the forward under bf16 autocast and converts the
model's outputs to fp32; full and freeze load fp32 master weights (or bf16 weights with
full_precision="bf16"); adapter methods keep a bf16 base and fp32 adapters (peft upcasts them).

What is modelled (one training micro-step on one GPU, in bytes):

- weights: the frozen base in bf16, NF4 (QLoRA, double quantisation) or int8 (8-bit QLoRA, with
  its fp32 row scales); the trainable ones in their dtype (fp32 master, bf16, fp32 adapters).
- gradients: one per trainable parameter, in the parameter's dtype.
- optimizer: AdamW's m and v. `adamw` plans them in fp32 (8 B/param, the conservative mixed
  precision recipe); `adamw_torch` plans what torch.optim.AdamW really allocates, `zeros_like(p)`,
  i.e. 4 B/param for bf16 params; `adamw_fused` (torch's fused kernel) allocates the same;
  `adamw_8bit` is bitsandbytes' 8-bit AdamW (2 B/param); `paged_adamw` (fp32 m and v, 8 B/param)
  and `paged_adamw_8bit` (2 B/param) live in CUDA unified memory that bitsandbytes allocates
  outside torch's allocator: planned as resident on the GPU (the driver moves pages to the host
  only under pressure, which a plan must not count on) but not part of `allocated`.
- activations: the tensors autograd saves, derived op by op below for a Llama decoder layer,
  plus the per-method extras (DoRA's two saved outputs per adapted module, IA3's scaled
  tensors, prefix tuning's longer keys). Frozen lower layers of `freeze` save nothing unless
  checkpointing makes the embedding output require a gradient.
- logits: see `logits_bytes`: with the whole-batch loss every position's logits exist at once
  (and in fp32); the chunked cross-entropy keeps only one chunk's logits alive.
- overhead: small buffers (ids, labels, rotary tables, masks, cuBLAS workspace, NF4/int8
  dequantisation scratch, DoRA's weight-norm scratch) and allocator fragmentation.

Peak memory is the largest of four moments of a micro-step: the end of the forward (all saved
activations plus autocast's cache of bf16 weight copies), the loss's forward, the start of backward (all saved
activations plus the loss's backward buffers, few gradients yet, because zero_grad(set_to_none)
freed them) and the end of backward (all gradients, one layer's activations). Between them memory
moves roughly linearly layer by layer, so the peak is at one of them. With optimizer_in_backward
(trainer/optim_in_backward.py) each decoder layer's gradients are freed by its AdamW step as soon
as they are complete, so the end of backward holds only the gradients outside the layers and one
layer's.

Speed modes: `fast` runs without gradient checkpointing, `lean` with it, `balanced` with it on the
bottom k decoder layers only (their inputs stored, the other layers' activations kept). Several GPUs: DDP
replicates weights, gradients and optimizer states on every GPU and adds its gradient buckets;
FSDP full-shard divides parameters, gradients and optimizer states by k and gathers one layer's
parameters (and prefetches the next) in bf16 at a time.

`allocated` is what torch.cuda.max_memory_allocated reports; `total` adds fragmentation (and paged
optimizer states) and is what must fit. The CUDA context (~0.5 GiB) is outside both; the fit
margin absorbs it.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

GiB = 1024**3

Method = Literal["full", "lora", "qlora", "ia3", "prefix", "freeze"]
# Every method the trainer has; `METHODS` is the ladder that method "auto" walks down.
ALL_METHODS: tuple[str, ...] = ("full", "lora", "qlora", "ia3", "prefix", "freeze")
METHODS: tuple[str, ...] = ("full", "lora", "qlora")
ADAPTER_METHODS: tuple[str, ...] = ("lora", "qlora", "ia3", "prefix")
WHOLE_WEIGHT_METHODS: tuple[str, ...] = ("full", "freeze")
Optimizer = Literal["adamw", "adamw_torch", "adamw_fused", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"]
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw_torch", "adamw_fused", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")
# JobSpec.optimizer -> the name here: the spec's "adamw" is torch's AdamW, what `adamw_torch` plans.
SPEC_OPTIMIZERS = {"adamw": "adamw_torch", "adamw_fused": "adamw_fused", "adamw_8bit": "adamw_8bit",
                   "paged_adamw": "paged_adamw", "paged_adamw_8bit": "paged_adamw_8bit"}
Strategy = Literal["ddp", "fsdp"]
FullPrecision = Literal["bf16", "fp32_master"]
Precision = Literal["bf16", "fp32"]
Speed = Literal["lean", "fast"]
SPEEDS: tuple[str, ...] = ("fast", "lean")  # the order "auto" tries them in

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

# The chunked linear cross-entropy: per logit of the live chunk, its bf16 value, the fp32 upcast,
# the fp32 gradient of the softmax and its bf16 cast back for the matmul.
CHUNK_BYTES_PER_LOGIT = 2 + 4 + 4 + 2
# peft's IA3 targets for Llama-shaped decoders, and those of them whose input is scaled.
IA3_DEFAULT_TARGETS = ("k_proj", "v_proj", "down_proj")
IA3_DEFAULT_FEEDFORWARD = ("down_proj",)


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
        n = sum(_lora_linear_params(r, m) for m in self.linears if m.name in chosen)
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
    total: int  # allocated plus fragmentation and paged optimizer states: what has to fit
    peak_at: str  # "forward_end", "loss_forward", "backward_start" or "backward_end"
    parts: dict[str, int]
    notes: list[str]
    speed: str = "fast"  # fast, lean or balanced (0 < checkpoint_layers < layers)
    loss: str = "whole"  # "whole" or "chunked(<tokens>)"
    checkpoint_layers: int = 0  # decoder layers checkpointed, from the bottom

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


def _lora_linear_params(r: int, m: Linear, use_dora: bool = False) -> int:
    """peft's A and B of one adapted linear, and DoRA's magnitude vector beside them."""
    return r * (m.in_features + m.out_features) + (m.out_features if use_dora else 0)


def _lora_params(shape: Shape, lora: _Lora, use_dora: bool = False) -> int:
    n = sum(_lora_linear_params(lora.r, m, use_dora) for m in shape.linears if m.name in lora.modules)
    n += sum(lora.r * (num + dim) for name, num, dim in shape.embeddings if name in lora.modules)
    return n


def _quantized_bytes(shape: Shape, bits: int, base_bytes: int) -> tuple[int, int]:
    """(bytes of the quantised decoder linears, their parameter count). bitsandbytes quantises
    every decoder linear; embeddings, the LM head and norms stay bf16."""
    quant = q_params = 0
    for m in shape.linears:
        if m.layer is None:
            continue
        n = m.in_features * m.out_features
        q_params += n
        if bits == 8:
            # LLM.int8(): one byte per weight and one fp32 scale per output row (SCB).
            quant += n + 4 * m.out_features
        else:
            blocks = math.ceil(n / NF4_BLOCK)
            quant += math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / NF4_BLOCKS_PER_SCALE) + NF4_CODE_BYTES
        if m.bias:
            quant += m.out_features * base_bytes
    return quant, q_params


def _module_suffixes(shape: Shape, names: tuple[str, ...] | list[str]) -> list[Linear]:
    """Decoder linears whose name is one of `names` or ends with '.' + one of them."""
    wanted = list(names)
    return [m for m in shape.linears if m.layer is not None
            and any(m.name == w or m.name.endswith("." + w) for w in wanted)]


def _ia3_vectors(shape: Shape, targets: list[str] | tuple[str, ...] | None = None,
                 feedforward: list[str] | tuple[str, ...] | None = None) -> list[tuple[Linear, int]]:
    """peft IA3: one scale per output feature of a target, per input feature of a feed-forward one."""
    targets = tuple(targets or IA3_DEFAULT_TARGETS)
    ff = set(feedforward if feedforward is not None else (IA3_DEFAULT_FEEDFORWARD if targets == IA3_DEFAULT_TARGETS else ()))
    return [(m, m.in_features if _layer_suffix(m.name).rsplit(".", 1)[-1] in ff else m.out_features)
            for m in _module_suffixes(shape, targets)]


def ia3_params(shape: Shape, targets: list[str] | tuple[str, ...] | None = None,
               feedforward: list[str] | tuple[str, ...] | None = None) -> int:
    """peft IA3: one scale per output feature of a target, per input feature of a feed-forward one."""
    return sum(n for _, n in _ia3_vectors(shape, targets, feedforward))


def prefix_params(shape: Shape, tokens: int = 16, projection: bool = False) -> int:
    """peft prefix tuning: a key and a value row of kv_heads x head_dim per layer and virtual
    token; with the projection, an embedding of one row per token and a two-layer MLP."""
    token_dim = shape.kv_heads * shape.head_dim
    out = shape.layers * 2 * token_dim
    if not projection:
        return tokens * out
    return tokens * token_dim + (token_dim * token_dim + token_dim) + (token_dim * out + out)


def freeze_trainable_params(shape: Shape, trainable_layers: int, train_embeddings: bool = False) -> int:
    """freeze: the top layers, the final norm and optionally the input embedding (and a tied head)."""
    return trainable_layers * shape.layer_params + shape.hidden + (shape.embedding_params if train_embeddings else 0)


def _layer_trainable(shape: Shape, method: str, *, lora: _Lora | None, use_dora: bool,
                     ia3_targets: list[str] | None, ia3_feedforward: list[str] | None,
                     freeze_layers: int | None) -> dict[int, int]:
    """Trainable parameters per decoder layer: the buckets optimizer_in_backward steps in backward.
    Those outside the layers (embeddings, head, final norm, prefix tuning's encoder) are not here:
    they wait for optimizer.step() after backward."""
    if method == "full":
        return dict.fromkeys(range(shape.layers), shape.layer_params)
    if method == "freeze":
        return dict.fromkeys(range(shape.layers - (freeze_layers or 0), shape.layers), shape.layer_params)
    per: dict[int, int] = {}
    if lora is not None:
        for m in shape.linears:
            if m.layer is not None and m.name in lora.modules:
                per[m.layer] = per.get(m.layer, 0) + _lora_linear_params(lora.r, m, use_dora)
    elif method == "ia3":
        for m, n in _ia3_vectors(shape, ia3_targets, ia3_feedforward):
            per[m.layer] = per.get(m.layer, 0) + n
    return per


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
    liger: bool = False,
    fused_mlp: bool = False,
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
    * With liger's kernels (the trainer's fast path on CUDA when installed): RMSNorm saves its
      input (rb·h) and the fp32 rstd (4), SwiGLU saves gate and up (2a·f) but not SiLU's output.
    * The trainer's fused LoRA layers (trainer/lora_fused.py) save the bf16 input shared with the
      base matmul and x·Aᵀ (a·r): pass a `_Lora` with quantized=True, which is the same pattern.
    * fused_mlp: the trainer's LoRA SwiGLU MLP as one function (trainer/lora_mlp.py), where gate,
      up and down are all adapted: it saves gate's and up's outputs (2a·f) and the x·Aᵀ, not the
      SiLU·up product that down would save as its input (backward rebuilds it).

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
    if liger:
        out["norms"] = 2 * (rb * h + 4)
    else:
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

    mlp_fused = (fused_mlp and lora is not None and shape.gated_mlp and len(adapted.get(MLP_IN, [])) == 2
                 and bool(adapted.get(MLP_MID)))
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
            elif mlp_fused and grp == MLP_MID:
                pass  # the fused MLP rebuilds down's input in backward
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
        out["mlp"] = (2 if liger or mlp_fused else 3) * a * f
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


def method_extra_bytes_per_token(
    shape: Shape, *, method: str, act_bytes: int = 2, lora: _Lora | None = None, use_dora: bool = False,
    autocast: bool = False, ia3_targets: list[str] | tuple[str, ...] | None = None,
    ia3_feedforward: list[str] | tuple[str, ...] | None = None,
) -> float:
    """Saved bytes per token and layer that a method adds to `layer_activation_bytes_per_token`.

    * DoRA (peft): `(m/‖W+BA‖ - 1) · base_out + m/‖W+BA‖ · lora_out · s` saves base_out (bf16)
      and lora_out (bf16 under autocast, else in the adapter's dtype) for the magnitude's
      gradient: (a + c)·out per adapted module.
    * IA3 (peft): a feed-forward target scales its input, `x · l`, which saves x (a·in); the
      others scale their output, which saves the base output (a·out).
    """
    a = act_bytes
    extra = 0.0
    if use_dora and lora is not None:
        c = a if autocast else lora.adapter_bytes
        extra += sum((a + c) * m.out_features for m in shape.linears if m.layer == 0 and m.name in lora.modules)
    if method == "ia3":
        targets = tuple(ia3_targets or IA3_DEFAULT_TARGETS)
        ff = set(ia3_feedforward if ia3_feedforward is not None
                 else (IA3_DEFAULT_FEEDFORWARD if targets == IA3_DEFAULT_TARGETS else ()))
        for m in _module_suffixes(shape, targets):
            if m.layer == 0:
                extra += a * (m.in_features if _layer_suffix(m.name).rsplit(".", 1)[-1] in ff else m.out_features)
    return extra


def logits_bytes(vocab: int, tokens: int, *, out_bytes: int, chunk_tokens: int | None = None,
                 hidden: int = 0, hidden_bytes: int = 4) -> dict[str, int]:
    """The loss's memory in bytes (T = batch x seq tokens, V vocab): "model_out" what the model's
    forward returns, "forward" the loss's forward, "peak" the start of backward, "kept" what stays
    to the end of backward.

    Whole batch (chunk_tokens None: trainer.loss_heads.PlainLoss, also FSDP's loss): the
    model's logits stay referenced through backward in `out_bytes` per logit (4: accelerate's
    mixed precision returns fp32 outputs); cross-entropy's log_softmax saves its fp32 output, and
    its backward holds the incoming and the outgoing fp32 gradient at once:
        kept = o·V·T,  peak = (o + 4 + 4 + 4)·V·T
    Chunked (trainer.linear_ce, the fast path): the model answers the head's input (hidden
    states in `hidden_bytes`, fp32 after accelerate's output conversion), the loss selects the
    labelled rows (fp32), casts them to bf16 and fills a bf16 gradient for them while it runs C
    tokens at a time; one chunk holds its bf16 logits or their bf16 gradient next to the fp32
    copy: 6·C·V. Nothing of size V·T ever exists:
        forward (the loss's own peak) = 6·C·V + (hb + 4 + 2 + 2)·h·T
        peak (backward start)         = 2·h·T (the saved gradient) + 8·h·T (its fp32 cast and
                                        the scatter back into the batch's shape)
    The head weight's gradient (computed in the loss's forward when the head trains) and the
    bf16 copy of an fp32 head are added by the caller.
    """
    if chunk_tokens is None:
        # forward: the logits, the loss's reshaped copy of them and log_softmax's output.
        return {"kept": out_bytes * vocab * tokens, "peak": (out_bytes + 12) * vocab * tokens,
                "forward": (out_bytes + 8) * vocab * tokens, "model_out": 2 * vocab * tokens}
    live = 6 * min(chunk_tokens, tokens) * vocab
    return {"kept": 0, "peak": 10 * hidden * tokens, "forward": live + (hidden_bytes + 8) * hidden * tokens,
            "model_out": hidden_bytes * hidden * tokens}


def estimate_memory(
    config: Any,
    *,
    method: Method,
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool = False,
    checkpoint_layers: int | None = None,
    checkpoint_offload: bool = False,
    optimizer_in_backward: bool = False,
    optimizer: Optimizer = "adamw",
    lora_r: int = 16,
    lora_targets: str | list[str] = "all-linear",
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quant_bits: int = 4,
    ia3_targets: list[str] | None = None,
    ia3_feedforward: list[str] | None = None,
    prefix_tokens: int = 16,
    prefix_projection: bool = False,
    freeze_layers: int | None = None,
    freeze_embeddings: bool = False,
    gpus: int = 1,
    strategy: Strategy = "ddp",
    full_precision: FullPrecision = "bf16",
    precision: Precision = "bf16",
    gradient_accumulation_steps: int = 1,
    padded: bool = True,
    autocast: bool = False,
    loss_chunk_tokens: int | None = None,
    fused_lora: bool = False,
    liger: bool = False,
    fragmentation: float | None = None,
) -> MemoryEstimate:
    """Peak memory per GPU of training `config` with `method` (see the module docstring).

    padded: batches carry a padding mask (the trainer pads to the longest example), which makes
    transformers repeat k/v heads and torch keep a float attention bias per layer. A batch
    without padding runs flash attention with no mask.
    autocast: the step runs as the trainer runs it, under accelerate's bf16 mixed precision:
    bf16 autocast inside the forward (its cache of bf16 weight copies, bf16 saved inputs of
    LoRA) and fp32 outputs (the logits). fp32-master full fine-tuning always assumes autocast.
    loss_chunk_tokens: the trainer's chunked linear cross-entropy with chunks of this many
    tokens; None is the whole-batch loss.
    fused_lora: the trainer's fused LoRA layers (plain LoRA on a bf16 or 4-bit base, no dropout,
    no DoRA); liger: liger's RMSNorm, RoPE and SwiGLU kernels replace the model's.
    checkpoint_layers: only the bottom k of the L decoder layers are checkpointed (speed
    balanced); None: all when gradient_checkpointing, else none. k = L is lean, k = 0 fast.
    checkpoint_offload: the checkpointed layers' inputs wait in host memory (trainer.offload); the
    GPU holds at most OFFLOAD_RESIDENT_LAYERS of them (the one in use and the one prefetched).
    optimizer_in_backward: each decoder layer's AdamW step runs in backward and frees its
    gradients (trainer/optim_in_backward.py); one GPU, torch AdamW, no accumulation.
    FSDP always checkpoints activations (the trainer turns on FSDP's own when speed is fast).
    """
    arguments = dict(locals())
    if method not in ALL_METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(ALL_METHODS)}")
    if batch_size < 1 or seq_len < 1 or gpus < 1:
        raise ValueError("batch_size, seq_len and gpus must be at least 1")
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy: {strategy!r} is not 'ddp' or 'fsdp'")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if quant_bits not in (4, 8):
        raise ValueError(f"quant_bits: {quant_bits} is not 4 or 8")
    if loss_chunk_tokens is not None and loss_chunk_tokens < 1:
        raise ValueError("loss_chunk_tokens must be at least 1")
    if optimizer_in_backward and (gpus > 1 or gradient_accumulation_steps > 1
                                  or optimizer not in ("adamw", "adamw_torch", "adamw_fused")):
        # What the trainer refuses (trainer/spec.py, trainer/loop.py) has no plan.
        raise ValueError("optimizer_in_backward: runs on one GPU with torch AdamW and gradient_accumulation_steps 1, "
                         f"not gpus {gpus}, optimizer {optimizer!r}, gradient_accumulation_steps "
                         f"{gradient_accumulation_steps}")
    shape = config if isinstance(config, Shape) else model_shape(config)
    if method == "freeze" and not (freeze_layers and 1 <= freeze_layers <= shape.layers):
        raise ValueError(f"freeze_layers: {freeze_layers} is outside 1..{shape.layers}")
    sharded = gpus > 1 and strategy == "fsdp"
    if sharded and method not in WHOLE_WEIGHT_METHODS:
        raise ValueError(f"strategy: fsdp is planned for full and freeze; {method} runs DDP over several GPUs")
    notes: list[str] = []
    h, L, V = shape.hidden, shape.layers, shape.vocab
    if checkpoint_layers is not None and not 0 <= checkpoint_layers <= L:
        raise ValueError(f"checkpoint_layers: {checkpoint_layers} is outside 0..{L}")
    if sharded and not gradient_checkpointing:
        gradient_checkpointing = True
        notes.append("FSDP checkpoints activations whatever the speed (trainer/distributed.py)")
    if sharded or checkpoint_layers is None:
        checkpoint_layers = L if gradient_checkpointing else 0
    ck = checkpoint_layers  # checkpointed layers, from the bottom
    gradient_checkpointing = ck > 0

    a = 4 if precision == "fp32" else 2  # activation / frozen-weight dtype
    whole = method in WHOLE_WEIGHT_METHODS
    fp32_master = whole and full_precision == "fp32_master" and precision != "fp32"
    # FSDP's mixed precision casts the parameters to bf16 as it gathers them: no autocast cache,
    # and the residual stream is bf16.
    casts = fp32_master and not sharded
    rb = 4 if casts else a  # residual stream bytes
    autocast = autocast or fp32_master
    lora = None
    fused = False
    if method in ("lora", "qlora"):
        modules = frozenset(shape.lora_targets(lora_targets))
        if not modules:
            raise ValueError(f"lora_targets: {lora_targets!r} matches no module of this model")
        # The fused layer applies to plain LoRA on a bf16 or 4-bit base; peft's own forward
        # otherwise. Both save the shared bf16 input where peft's 4-bit layer does.
        fused = fused_lora and lora_dropout == 0 and not use_dora and not (method == "qlora" and quant_bits == 8)
        lora = _Lora(r=lora_r, dropout=lora_dropout, adapter_bytes=4, modules=modules,
                     quantized=(method == "qlora" and quant_bits == 4) or fused)

    # --- parameters, gradients, optimizer -------------------------------------------------
    head_matmul = V * h
    layer_matmul = sum(m.in_features * m.out_features for m in shape.linears if m.layer == 0)
    if whole:
        param_bytes = 4 if (fp32_master or precision == "fp32") else 2
        weights = shape.total_params * param_bytes
        weight_parts = {"base_weights": weights}
        if method == "full":
            trainable = shape.total_params
        else:
            trainable = freeze_trainable_params(shape, freeze_layers, freeze_embeddings)
        grad_bytes = param_bytes
    else:
        if method == "qlora":
            quant, q_params = _quantized_bytes(shape, quant_bits, a)
            biases = sum(m.out_features for m in shape.linears if m.layer is not None and m.bias)
            rest = (shape.total_params - q_params - biases) * a
            weight_parts = {"nf4_linears" if quant_bits == 4 else "int8_linears": quant, "bf16_rest": rest}
        else:
            weight_parts = {"base_weights": shape.total_params * a}
        if lora is not None:
            trainable = _lora_params(shape, lora, use_dora)
        elif method == "ia3":
            trainable = ia3_params(shape, ia3_targets, ia3_feedforward)
        else:
            trainable = prefix_params(shape, prefix_tokens, prefix_projection)
        weight_parts["adapters"] = trainable * 4  # peft keeps adapters in fp32
        weights = sum(weight_parts.values())
        param_bytes = grad_bytes = 4
    grads = trainable * grad_bytes
    state_bytes = {"adamw": 8, "adamw_torch": 2 * param_bytes, "adamw_fused": 2 * param_bytes, "adamw_8bit": 2,
                   "paged_adamw": 8, "paged_adamw_8bit": 2}[optimizer]
    opt = trainable * state_bytes
    paged = optimizer.startswith("paged_")
    if paged:
        notes.append("paged optimizer states live in unified memory outside torch's allocator: counted in total, "
                     "not in allocated; under pressure the driver moves them to host memory")
    if optimizer in ("adamw_torch", "adamw_fused") and whole and param_bytes == 2:
        notes.append("torch AdamW keeps m and v in the parameters' dtype: bf16 here")

    # --- sharding / replication ----------------------------------------------------------
    ddp_buckets = 0
    fsdp_unit_grad = 0
    if sharded:
        # Sharded fp32 (or bf16) master copy; bf16 copies gathered for the root unit (embedding,
        # head, final norm: gathered through the whole step) and for one layer plus the prefetched next.
        root = shape.embedding_params + shape.lm_head_params + h
        gathered = 2 * root + 2 * 2 * shape.layer_params
        weights = math.ceil(weights / gpus) + gathered
        weight_parts["fsdp_gathered_units"] = gathered
        grads = math.ceil(grads / gpus)
        # A unit's unsharded bf16 gradient and its fp32 copy for the reduction exist until it is
        # reduce-scattered.
        fsdp_unit_grad = (2 + 4) * max(shape.layer_params, root)
        opt = math.ceil(opt / gpus)
        notes.append(f"FSDP full shard over {gpus} GPUs: weights, gradients and optimizer divided by {gpus}")
    elif gpus > 1:
        # DDP copies gradients into its all-reduce buckets (gradient_as_bucket_view is off).
        ddp_buckets = trainable * grad_bytes
        notes.append(f"DDP over {gpus} GPUs: every GPU holds the whole model plus gradient buckets")

    # --- activations ----------------------------------------------------------------------
    tokens = batch_size * seq_len
    if method == "prefix":
        padded = True  # peft extends the attention mask by the virtual tokens
    lora_autocast = autocast and a == 2
    per_layer = layer_activation_bytes_per_token(
        shape,
        act_bytes=a,
        residual_bytes=rb,
        base_trainable=whole,
        lora=lora,
        padded=padded,
        seq_len=seq_len + (prefix_tokens if method == "prefix" else 0),
        autocast=lora_autocast,
        liger=liger,
        fused_mlp=fused,
    )
    layer_tok = per_layer["total"] + method_extra_bytes_per_token(
        shape, method=method, act_bytes=a, lora=lora, use_dora=use_dora, autocast=lora_autocast,
        ia3_targets=ia3_targets, ia3_feedforward=ia3_feedforward,
    )
    # Layers that save activations without checkpointing: freeze's frozen lower layers see an
    # input that needs no gradient, so they save nothing.
    saving_layers = freeze_layers if method == "freeze" else L
    if gradient_checkpointing:
        # Non-reentrant checkpointing keeps each checkpointed layer's input (the residual stream)
        # and recomputes one layer at a time in backward. With a frozen embedding the trainer
        # makes its output require a gradient, so every layer above saves its activations.
        resident = min(ck, OFFLOAD_RESIDENT_LAYERS) if checkpoint_offload else ck
        stored = resident * rb * h * tokens + (L - ck) * layer_tok * tokens
        recompute = layer_tok * tokens
        if ck > resident:
            notes.append(f"checkpoint_offload: {_gib((ck - resident) * rb * h * tokens)} of checkpointed layers' "
                         f"inputs wait in pinned host memory ({_gib(ck * rb * h * tokens)} of host memory)")
    else:
        stored = saving_layers * layer_tok * tokens
        recompute = 0
    if method == "prefix":
        # The virtual tokens' keys and values, saved by attention per layer and row.
        stored += L * batch_size * prefix_tokens * 2 * a * shape.heads * shape.head_dim
    # Final norm: its fp32 copy, its output when its weight trains, and what the head keeps.
    norm_trains = method in ("full", "freeze")
    head_trains = method == "full" or (method == "freeze" and freeze_embeddings and shape.tied)
    chunk = None if sharded else loss_chunk_tokens  # FSDP's head is sharded: the plain loss
    head_tok = (rb * h + 4) if liger else (4 * h + 4 + (rb * h if norm_trains else 0))
    if chunk is None and head_trains:
        head_tok += (2 if autocast else rb) * h  # the head's saved input
    # (the chunked loss computes its gradients in its forward and keeps no input)
    head_acts = head_tok * tokens
    transient = _backward_transient_per_token(shape, a, lora) * tokens

    # Autocast caches a bf16 copy of every fp32 weight that trains (a leaf that requires grad)
    # until the forward ends; the matmul saves it for backward unless the layer is checkpointed.
    # Frozen fp32 weights (freeze's lower layers) are cast anew and saved only where their input
    # needs a gradient: the head's.
    cache_saved = cache_forward = cache_recompute = 0
    if casts:
        trained_layers = L if method == "full" else freeze_layers
        head_cast = 0 if chunk is not None else 2 * head_matmul
        layers_cast = 2 * trained_layers * layer_matmul
        cache_forward = layers_cast + head_cast
        # The layers that are not checkpointed save their casts (the top ones, which train in freeze too).
        cache_saved = head_cast + 2 * min(trained_layers, L - ck) * layer_matmul
        cache_recompute = 2 * layer_matmul if gradient_checkpointing else 0
    elif lora is not None and lora_autocast and not fused:
        cache_forward = 2 * trainable
        cache_saved = 2 * trainable * (L - ck) // L
        cache_recompute = 2 * trainable // L if gradient_checkpointing else 0

    # --- logits -------------------------------------------------------------------------
    logit_out_bytes = 4 if autocast else a
    lg = logits_bytes(V, tokens, out_bytes=logit_out_bytes, chunk_tokens=chunk, hidden=h,
                      hidden_bytes=4 if autocast else rb)
    if chunk is not None and head_trains:
        # The head's gradient exists from the loss's forward on (at the end of backward it is
        # one of `grads`); an fp32 head is cast to bf16 for the loop.
        head_grad = head_matmul * grad_bytes if gradient_accumulation_steps == 1 else 0
        lg = {**lg, "peak": lg["peak"] + head_grad,
              "forward": lg["forward"] + head_grad + (2 * head_matmul if param_bytes == 4 and a == 2 else 0)}

    # --- small things -------------------------------------------------------------------
    small = 2 * 8 * tokens  # input ids and labels (int64)
    small += 2 * 8 * tokens  # shifted labels and the padded copy in the loss
    small += 2 * a * shape.head_dim * tokens  # rotary cos/sin, shared by all layers
    if padded:
        small += batch_size * seq_len * (seq_len + (prefix_tokens if method == "prefix" else 0))  # bool 4D mask
    small += LIBRARY_WORKSPACE_BYTES
    largest = max((m.in_features * m.out_features for m in shape.linears if m.layer is not None), default=0)
    widest_in = max((m.in_features for m in shape.linears if m.layer is not None), default=h)
    if method == "qlora" and quant_bits == 4:
        # bitsandbytes dequantises one weight to bf16 per matmul, forward and backward.
        small += 2 * a * largest
    elif method == "qlora":
        # int8 matmul: the fp16 copy and int8 quantisation of its input, and the weight
        # dequantised to fp16 for the input gradient.
        small += 2 * largest + 3 * widest_in * tokens
    if use_dora and lora is not None:
        # DoRA recomputes ‖W + BA‖ every forward: W+BA and B@A as fp32 matrices, plus peft's
        # identity of the input width (in x in) for the LoRA weight.
        small += 3 * 4 * largest + 4 * widest_in * widest_in

    # --- candidate peaks ------------------------------------------------------------------
    grads_always = grads if gradient_accumulation_steps > 1 else 0
    # Tied full fine-tuning: the LM head's and the embedding's grads meet in one buffer at the end.
    tie_transient = shape.vocab * shape.hidden * grad_bytes if (head_trains and shape.tied and not sharded) else 0
    forward_acts = stored + head_acts + cache_forward
    start_acts = stored + head_acts + cache_saved
    end_acts = recompute + transient + cache_recompute + (0 if gradient_checkpointing else layer_tok * tokens)
    end_grads = grads + tie_transient + fsdp_unit_grad
    freed_in_backward = 0
    if optimizer_in_backward:
        per_layer_trainable = _layer_trainable(shape, method, lora=lora, use_dora=use_dora, ia3_targets=ia3_targets,
                                               ia3_feedforward=ia3_feedforward, freeze_layers=freeze_layers)
        one_layer_grads = max(per_layer_trainable.values(), default=0) * grad_bytes
        freed_in_backward = sum(per_layer_trainable.values()) * grad_bytes - one_layer_grads
        # Only the layer being finished keeps its gradients; layer 0's step has freed them before the
        # embedding's backward runs (autograd runs AccumulateGrad first), so the tied embedding's
        # second gradient never meets them: the larger of the two, not both.
        end_grads = grads - freed_in_backward - one_layer_grads + max(one_layer_grads, tie_transient)
        notes.append(f"optimizer_in_backward: each decoder layer's AdamW step frees its gradients in backward, "
                     f"{_gib(freed_in_backward)} of gradients never held (at most one layer's, "
                     f"{_gib(one_layer_grads)}, at once)")
    moments = [
        # the model's forward ends: autocast's cache still holds every cast weight
        ("forward_end", grads_always, forward_acts, lg["model_out"]),
        # the loss's own forward (the chunk loop, or the fp32 copies of the whole logits)
        ("loss_forward", grads_always, start_acts, lg["forward"]),
        ("backward_start", grads_always, start_acts, lg["peak"]),
        ("backward_end", end_grads, end_acts, lg["kept"]),
    ]
    peak_at, live_grads, live_acts, live_logits = max(moments, key=lambda m: m[1] + m[2] + m[3])

    live_grads += ddp_buckets
    opt_allocated = 0 if paged else opt
    allocated = weights + live_grads + opt_allocated + live_acts + live_logits + small
    if fragmentation is None:
        # Measured at k = L; any k > 0 ends its backward recomputing bottom layers between the
        # grown gradients, which is where that fragmentation comes from.
        full_ckpt = whole and ck > 0
        fragmentation = FULL_CHECKPOINTED_FRAGMENTATION if full_ckpt else DEFAULT_FRAGMENTATION
    frag = int(allocated * fragmentation)
    if whole and 0 < ck < L and arguments["fragmentation"] is None:
        # Checkpointing a layer never costs memory: the checkpointed-run fragmentation must not
        # outweigh the one layer saved (fp32 master weights inflate it past that).
        fast_total = estimate_memory(**{**arguments, "checkpoint_layers": 0}).total
        frag = max(0, min(frag, fast_total - allocated - (opt if paged else 0)))
    overhead = small + frag
    total = allocated + frag + (opt if paged else 0)

    parts = {
        **weight_parts,
        "gradients_all": grads,
        "optimizer_states": opt,
        "ddp_buckets": ddp_buckets,
        "fsdp_unit_gradient": fsdp_unit_grad,
        "activations_stored": stored,
        "activations_head": head_acts,
        "activations_recompute_layer": recompute,
        "backward_transient": transient,
        "autocast_weight_cache": cache_saved,
        "autocast_weight_cache_forward": cache_forward,
        "logits_peak": lg["peak"],
        "logits_kept": lg["kept"],
        "logits_forward": lg["forward"],
        "tied_grad_transient": tie_transient,
        "small_buffers": small,
        "fragmentation": frag,
        "layer_bytes_per_token": int(layer_tok),
    }
    if optimizer_in_backward:  # only then, so that the default's parts stay as they were
        parts["gradients_freed_in_backward"] = freed_in_backward
    if ck < L and layer_tok * tokens * (L - ck if ck else saving_layers) > 0.5 * total:
        notes.append("activations dominate: speed lean (gradient checkpointing) would cut them to one layer's worth")
    if lg["peak"] > 0.3 * total:
        notes.append("logits and the loss's fp32 copies dominate: a shorter max_seq_len or smaller batch helps most")
    return MemoryEstimate(
        method=method,
        batch_size=batch_size,
        seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing,
        optimizer=optimizer,
        gpus=gpus,
        strategy=strategy if gpus > 1 else "single",
        full_precision=full_precision if whole else "n/a",
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
        speed="lean" if ck == L else "fast" if ck == 0 else "balanced",
        loss="whole" if chunk is None else f"chunked({chunk})",
        checkpoint_layers=ck,
    )



# Checkpointed layers' inputs on the GPU with checkpoint_offload: the one whose copy to the host is
# still running or whose recompute runs, and the next one's, prefetched.
OFFLOAD_RESIDENT_LAYERS = 2


def fewest_checkpoint_layers(spec_like: Any, config: Any, budget_bytes: float, **kwargs: Any) -> int | None:
    """Speed balanced's k: the fewest checkpointed decoder layers (the most kept whole) whose
    estimate fits budget_bytes; None when not even all of them checkpointed fits."""
    shape = config if isinstance(config, Shape) else model_shape(config)
    for k in range(shape.layers + 1):  # the estimate only shrinks as k grows (tested)
        if estimate_for_spec(spec_like, shape, speed="balanced", checkpoint_layers=k, **kwargs).total <= budget_bytes:
            return k
    return None


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
    freeze_layers: int | None = None,
    peak_tflops: float | None = None,
    efficiency: float | None = None,
) -> ComputeEstimate:
    """Training FLOPs and wall time for `tokens` tokens (padding included).

    Matmul FLOPs per token, N = decoder linear weights + LM head (tied or not):
      full:        6N  (forward 2N, input grads 2N, weight grads 2N)
      lora/qlora:  4N + 6·trainable  (frozen base: forward and input grads only)
      ia3/prefix:  4N                (their few parameters cost next to nothing)
      freeze:      2N + 4·N_top      (backward stops below the top layers' weights)
    Attention scores and values, per token: 4·L·(n·d)·S forward, three times that with backward,
    halved by the causal mask: 6·L·(n·d)·S. Checkpointing recomputes the forward once more.
    peak_tflops: per GPU, default the measured H200 bf16 matmul peak; efficiency: the fraction of
    it a real step reaches.
    """
    if method not in ALL_METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(ALL_METHODS)}")
    shape = config if isinstance(config, Shape) else model_shape(config)
    N = shape.matmul_params
    notes: list[str] = []
    if method == "full":
        mm = 6.0 * N
        fwd = 2.0 * N
    elif method == "freeze":
        layer_mm = sum(m.in_features * m.out_features for m in shape.linears if m.layer == 0)
        top = (freeze_layers or shape.layers) * layer_mm + shape.vocab * shape.hidden
        mm = 2.0 * N + 4.0 * top
        fwd = 2.0 * N
    elif method in ("ia3", "prefix"):
        mm = 4.0 * N
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
# With batch_size "auto" and speed "auto", fast (no checkpointing) is taken only when it fits at
# this micro-batch or more: a GPU that fits fast only at batch 1 or 2 is better used lean.
AUTO_FAST_MIN_BATCH = 4

# How the trainer runs a step, which a plan assumes unless the spec says otherwise.
TRAINER_AUTOCAST = True  # accelerate's bf16 mixed precision: autocast forward, fp32 outputs
TRAINER_FULL_PRECISION: FullPrecision = "fp32_master"
# The fast path (trainer/fastpath.py, on unless TUNEQ_FASTPATH=0): the chunked loss with the
# chunk trainer.linear_ce picks for the vocabulary, fused LoRA layers; liger's kernels only where
# liger-kernel is installed on the GPU host, which the API cannot see: planned without them
# (they save memory, so the plan errs high).
TRAINER_LOSS_CHUNK_TOKENS: int | None | Literal["auto"] = "auto"
TRAINER_FUSED_LORA = True
TRAINER_LIGER = False


def trainer_chunk_tokens(vocab: int) -> int | None:
    """The chunk the trainer's chunked loss takes for this vocabulary; None for a trainer
    without the chunked loss (its whole-batch loss)."""
    try:
        from trainer.linear_ce import chunk_tokens
    except ImportError:
        return None
    return chunk_tokens(vocab)


@dataclass(frozen=True)
class MethodPlan:
    method: str
    batch_size: int | None  # None: not even batch 1 fits (auto batch)
    fits: bool
    headroom_bytes: int  # usable memory minus the estimate's total; negative when it does not fit
    estimate: MemoryEstimate
    speed: str = "fast"  # fast: no gradient checkpointing; lean: checkpointing; balanced: the bottom k layers
    strategy: str = "single"  # single, ddp or fsdp
    checkpoint_layers: int | None = None  # speed balanced's k

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["estimate"] = self.estimate.to_dict()
        d["gradient_checkpointing"] = self.speed in ("lean", "balanced")
        return d


@dataclass(frozen=True)
class Plan:
    model: dict[str, Any]
    gpu_memory_bytes: int
    gpus: int
    strategy: str  # of the chosen method (or of the requested one when refused)
    margin: float
    usable_bytes: int
    requested_method: str
    requested_batch_size: int | str
    requested_speed: str
    seq_len: int
    gradient_checkpointing: bool
    methods: dict[str, MethodPlan]
    method: str | None  # chosen; None when refused
    batch_size: int | None
    speed: str | None
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
            "requested_speed": self.requested_speed,
            "seq_len": self.seq_len,
            "gradient_checkpointing": self.gradient_checkpointing,
            "methods": {k: v.to_dict() for k, v in self.methods.items()},
            "method": self.method,
            "batch_size": self.batch_size,
            "speed": self.speed,
            "fits": self.fits,
            "message": self.message,
            "suggestions": self.suggestions,
            "compute": self.compute.to_dict() if self.compute is not None else None,
        }


@dataclass(frozen=True)
class _Job:
    """The planning-relevant fields of a JobSpec (or of a JobSpec-shaped mapping that may say
    method "auto", batch_size "auto" and speed "auto", which JobSpec itself may not accept)."""

    method: str
    batch_size: int | str
    seq_len: int
    speed: str  # "fast", "lean", "balanced" or "auto"
    lora_r: int
    lora_targets: str | list[str]
    lora_dropout: float
    use_dora: bool
    quant_bits: int
    ia3_targets: list[str] | None
    ia3_feedforward: list[str] | None
    prefix_tokens: int
    prefix_projection: bool
    freeze_layers: int | None
    freeze_embeddings: bool
    optimizer: str | None  # planner name; None: the spec does not say
    full_precision: str | None
    strategy: str  # auto, ddp or fsdp
    precision: str
    n_epochs: int
    max_steps: int | None
    grad_accum: int
    checkpoint_layers: int | None = None  # speed balanced; None: the trainer picks
    checkpoint_offload: bool = False
    optimizer_in_backward: bool = False

    @property
    def gradient_checkpointing(self) -> bool:
        return self.speed == "lean"


def _get(obj: Any, key: str, default: Any) -> Any:
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        value = obj.get(key, default)
    else:
        value = getattr(obj, key, default)
    return default if value is None else value


def _job(spec_like: Any) -> _Job:
    hp = _get(spec_like, "hyperparameters", None)
    lora = _get(spec_like, "lora", None)
    quant = _get(spec_like, "quantization", None)
    ia3 = _get(spec_like, "ia3", None)
    prefix = _get(spec_like, "prefix", None)
    freeze = _get(spec_like, "freeze", None)
    precision = _get(spec_like, "precision", "auto")
    # A mapping may say batch_size None or "auto": the planner picks it.
    has_batch = hp is not None and ("batch_size" in hp if isinstance(hp, Mapping) else hasattr(hp, "batch_size"))
    raw_batch = (hp.get("batch_size") if isinstance(hp, Mapping) else hp.batch_size) if has_batch else 4
    batch = "auto" if raw_batch in (None, "auto") else raw_batch
    speed = _get(spec_like, "speed", None)
    if speed not in ("fast", "lean", "auto", "balanced"):
        speed = "lean" if _get(spec_like, "gradient_checkpointing", False) else "fast"
    optimizer = _get(spec_like, "optimizer", None)
    full_precision = _get(spec_like, "full_precision", None)
    return _Job(
        method=str(_get(spec_like, "method", "lora")),
        batch_size=batch if batch == "auto" else int(batch),
        seq_len=int(_get(hp, "max_seq_len", 1024)),
        speed=speed,
        lora_r=int(_get(lora, "r", 16)),
        lora_targets=_get(lora, "target_modules", "all-linear"),
        lora_dropout=float(_get(lora, "dropout", 0.0)),
        use_dora=bool(_get(lora, "use_dora", False)),
        quant_bits=int(_get(quant, "bits", 4)),
        ia3_targets=_get(ia3, "target_modules", None),
        ia3_feedforward=_get(ia3, "feedforward_modules", None),
        prefix_tokens=int(_get(prefix, "num_virtual_tokens", 16)),
        prefix_projection=bool(_get(prefix, "prefix_projection", False)),
        freeze_layers=_get(freeze, "trainable_layers", None),
        freeze_embeddings=bool(_get(freeze, "train_embeddings", False)),
        optimizer=SPEC_OPTIMIZERS.get(optimizer, optimizer) if optimizer else None,
        full_precision=full_precision if full_precision in ("bf16", "fp32_master") else None,
        strategy=str(_get(spec_like, "strategy", "auto")),
        # "auto" means bf16 on any GPU this service plans for.
        precision="fp32" if precision == "fp32" else "bf16",
        n_epochs=int(_get(hp, "n_epochs", 1)),
        max_steps=_get(hp, "max_steps", None),
        grad_accum=int(_get(hp, "gradient_accumulation_steps", 1)),
        checkpoint_layers=_get(spec_like, "checkpoint_layers", None),
        checkpoint_offload=bool(_get(spec_like, "checkpoint_offload", False)),
        optimizer_in_backward=bool(_get(spec_like, "optimizer_in_backward", False)),
    )


def estimate_for_spec(
    spec_like: Any,
    config: Any,
    *,
    method: str | None = None,
    batch_size: int | None = None,
    speed: str | None = None,
    gpus: int = 1,
    strategy: Strategy = "ddp",
    optimizer: str | None = None,
    full_precision: FullPrecision | None = None,
    autocast: bool | None = None,
    loss_chunk_tokens: int | None | Literal["trainer"] = "trainer",
    padded: bool = True,
    seq_len: int | None = None,
    fast_path: bool = True,
    liger: bool | None = None,
    checkpoint_layers: int | None = None,
    checkpoint_offload: bool | None = None,
    optimizer_in_backward: bool | None = None,
) -> MemoryEstimate:
    """`estimate_memory` for a JobSpec (or a JobSpec-shaped mapping) as the trainer runs it.

    method, batch_size, speed and seq_len override the spec's (for "auto" and for suggestions);
    the other keywords override what the trainer does by default. fast_path False plans the
    plain loop (TUNEQ_FASTPATH=0): whole-batch loss, peft's LoRA layers, no liger.
    checkpoint_layers (or the spec's) is speed balanced's k; balanced without one is planned as
    lean, the most the trainer's choice of k can need. checkpoint_offload and optimizer_in_backward
    override the spec's; on several GPUs (which the trainer refuses it on) optimizer_in_backward is
    planned off, with a note, so that suggestions of more GPUs stay plannable.
    """
    job = _job(spec_like)
    shape = config if isinstance(config, Shape) else model_shape(config)
    chunk = TRAINER_LOSS_CHUNK_TOKENS if loss_chunk_tokens == "trainer" else loss_chunk_tokens
    if chunk == "auto":
        chunk = trainer_chunk_tokens(shape.vocab)
    if not fast_path:
        chunk, liger = None, False
    m = method or job.method
    b = batch_size if batch_size is not None else job.batch_size
    if b == "auto":
        raise ValueError("batch_size: give a number to estimate; 'auto' is resolved by plan()")
    sp = speed or job.speed
    if sp == "auto":
        raise ValueError("speed: give fast or lean to estimate; 'auto' is resolved by plan()")
    k = None
    if sp == "balanced":
        k = checkpoint_layers if checkpoint_layers is not None else job.checkpoint_layers
        k = shape.layers if k is None else int(k)
    in_backward = job.optimizer_in_backward if optimizer_in_backward is None else optimizer_in_backward
    e = estimate_memory(
        shape,
        method=m,
        batch_size=int(b),
        seq_len=seq_len or job.seq_len,
        gradient_checkpointing=sp == "lean" or (k is not None and k > 0),
        checkpoint_layers=k,
        checkpoint_offload=job.checkpoint_offload if checkpoint_offload is None else checkpoint_offload,
        optimizer_in_backward=in_backward and gpus == 1,
        optimizer=optimizer or job.optimizer or "adamw_torch",
        lora_r=job.lora_r,
        lora_targets=job.lora_targets,
        lora_dropout=job.lora_dropout,
        use_dora=job.use_dora and m in ("lora", "qlora"),
        quant_bits=job.quant_bits,
        ia3_targets=job.ia3_targets,
        ia3_feedforward=job.ia3_feedforward,
        prefix_tokens=job.prefix_tokens,
        prefix_projection=job.prefix_projection,
        freeze_layers=job.freeze_layers,
        freeze_embeddings=job.freeze_embeddings,
        gpus=gpus,
        strategy=strategy,
        full_precision=full_precision or job.full_precision or TRAINER_FULL_PRECISION,
        precision=job.precision,
        gradient_accumulation_steps=job.grad_accum,
        padded=padded,
        autocast=TRAINER_AUTOCAST if autocast is None else autocast,
        loss_chunk_tokens=chunk,
        fused_lora=fast_path and TRAINER_FUSED_LORA,
        liger=TRAINER_LIGER if liger is None else liger,
    )
    if in_backward and gpus > 1:
        e = replace(e, notes=[*e.notes, f"optimizer_in_backward runs on one GPU: planned without it on {gpus} GPUs"])
    return e


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def choose_method(methods: Mapping[str, MethodPlan]) -> str | None:
    """For method "auto": full fine-tuning when it fits, else LoRA, else QLoRA, else None."""
    for m in METHODS:
        if m in methods and methods[m].fits:
            return m
    return None


def _strategy(method: str, gpus: int, strategy: str) -> str:
    """How the trainer spreads `method` over the GPUs (trainer.distributed.resolve_strategy):
    auto is FSDP for full and freeze, DDP for adapters; adapters never shard."""
    if gpus == 1 or method not in WHOLE_WEIGHT_METHODS:
        return "ddp"  # on one GPU neither replicates nor shards anything
    return "fsdp" if strategy == "auto" else strategy


def plan(
    spec_like: Any,
    config: Any,
    gpu_memory_bytes: int,
    gpus: int = 1,
    dataset_tokens: int | None = None,
    *,
    margin: float = DEFAULT_MARGIN,
    strategy: Literal["auto", "ddp", "fsdp"] | None = None,
    optimizer: Optimizer | None = None,
    full_precision: FullPrecision | None = None,
    padded: bool = True,
    autocast: bool | None = None,
    loss_chunk_tokens: int | None | Literal["trainer"] = "trainer",
    peak_tflops: float | None = None,
    efficiency: float | None = None,
) -> Plan:
    """Estimate every method for this job on `gpus` GPUs of `gpu_memory_bytes` each, pick one.

    A setting fits when its total stays under (1 - margin) of the GPU's memory. Method "auto"
    takes the first of full, lora, qlora that fits; speed "auto" takes fast when it fits (with
    batch_size "auto": at a micro-batch of AUTO_FAST_MIN_BATCH or more), else lean; batch_size
    "auto" takes the largest power of two up to 64 that fits. On several GPUs adapters run DDP,
    full and freeze FSDP unless the spec (or `strategy`) says ddp. A requested method
    that does not fit is refused with a message that names what would fit, with numbers.
    Unset keywords (None, "trainer") mean: as the spec says, else as the trainer runs.
    """
    if gpu_memory_bytes <= 0:
        raise ValueError("gpu_memory_bytes must be positive")
    if not 0 <= margin < 1:
        raise ValueError(f"margin: {margin} is outside [0, 1)")
    job = _job(spec_like)
    if job.method not in (*ALL_METHODS, "auto"):
        raise ValueError(f"method: {job.method!r} is not one of {', '.join(ALL_METHODS)}, auto")
    shape = config if isinstance(config, Shape) else model_shape(config)
    usable = int(gpu_memory_bytes * (1 - margin))

    def est(method: str, batch: int, *, speed: str | None = None, seq: int | None = None, k: int | None = None,
            strat: str = "ddp", layers: int | None = None) -> MemoryEstimate:
        return estimate_for_spec(
            spec_like, shape, method=method, batch_size=batch,
            speed=speed or (job.speed if job.speed in ("lean", "balanced") else "fast"),
            seq_len=seq, gpus=k or gpus, strategy=strat, optimizer=optimizer, full_precision=full_precision,
            autocast=autocast, loss_chunk_tokens=loss_chunk_tokens, padded=padded, checkpoint_layers=layers,
        )

    def est_balanced(method: str, batch: int, strat: str) -> MemoryEstimate:
        """Balanced with the spec's k, else the fewest checkpointed layers that fit (all when none
        does), as the trainer resolves it on the GPU."""
        k = job.checkpoint_layers
        if k is None:
            for k in range(shape.layers + 1):  # the estimate only shrinks as k grows
                e = est(method, batch, speed="balanced", strat=strat, layers=k)
                if e.total <= usable:
                    return e
        return est(method, batch, speed="balanced", strat=strat, layers=k)

    # speed auto, as the trainer resolves it: fast when it fits, else the fewest checkpointed
    # layers that fit (balanced), else all of them (lean).
    speeds = ["fast", "balanced", "lean"] if job.speed == "auto" else [job.speed]

    def best(m: str) -> MethodPlan:
        """The first (strategy, speed) of `m` that fits, with its batch; else the leanest try."""
        last: MethodPlan | None = None
        # Prefix tuning's past key/values bypass checkpointing: the trainer refuses it.
        tries = ["fast"] if m == "prefix" else speeds
        for strat in [_strategy(m, gpus, strategy or job.strategy)]:
            for sp in tries:
                # Under auto, keeping activations only pays at a useful micro-batch.
                fast_needs = AUTO_FAST_MIN_BATCH if (sp in ("fast", "balanced") and len(tries) > 1) else 1
                label = strat if gpus > 1 else "single"

                def one(b: int, sp: str = sp, strat: str = strat) -> MemoryEstimate:
                    return est_balanced(m, b, strat) if sp == "balanced" else est(m, b, speed=sp, strat=strat)

                if job.batch_size == "auto":
                    chosen_b, e = None, one(1)
                    b = AUTO_BATCH_MAX
                    while b >= fast_needs:
                        e_b = one(b)
                        if e_b.total <= usable:
                            chosen_b, e = b, e_b
                            break
                        b //= 2
                    mp = MethodPlan(m, chosen_b, chosen_b is not None, usable - e.total, e, sp, label)
                else:
                    e = one(int(job.batch_size))
                    mp = MethodPlan(m, int(job.batch_size), e.total <= usable, usable - e.total, e, sp, label)
                if sp == "balanced" and len(tries) > 1 and not 0 < e.checkpoint_layers < shape.layers:
                    continue  # all or none checkpointed: that is lean or fast, tried on their own
                if sp == "balanced":
                    mp = replace(mp, checkpoint_layers=e.checkpoint_layers)
                if mp.fits:
                    return mp
                last = mp
        assert last is not None
        return last

    candidates = list(METHODS)
    if job.method not in ("auto", *METHODS):
        candidates.append(job.method)
    methods = {m: best(m) for m in candidates}

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
            f"max_seq_len {job.seq_len}, speed {mp.speed}"
            + (f" (bottom {mp.checkpoint_layers} of {shape.layers} layers checkpointed)" if mp.speed == "balanced" else "")
            + (f", {mp.strategy.upper()} over {gpus} GPUs" if gpus > 1 else "")
        )
    else:
        focus = target if target != "auto" else "qlora"
        batch = 1 if job.batch_size == "auto" else int(job.batch_size)
        mp = methods[focus]
        need = mp.estimate.total
        suggestions = _suggest(est, focus, batch, mp.speed, job, usable, gpus)
        what = f"{focus} fine-tuning" if target != "auto" else "no method (full, lora or qlora)"
        message = (
            f"{what} of this {shape.total_params / 1e9:.2f}B-parameter model does not fit: "
            f"{focus} needs {_gib(need)} per GPU at batch_size {batch}, max_seq_len {job.seq_len}, "
            f"speed {mp.speed} (gradient_checkpointing {str(mp.speed != 'fast').lower()})"
            + (f", {mp.strategy.upper()} over {gpus} GPUs" if gpus > 1 else "")
            + f"; usable is {_gib(usable)} ({_gib(gpu_memory_bytes)} less {margin:.0%} headroom)."
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
            gradient_checkpointing=methods[chosen].speed == "lean",
            lora_r=job.lora_r,
            lora_targets=job.lora_targets,
            freeze_layers=job.freeze_layers,
            peak_tflops=peak_tflops,
            efficiency=efficiency,
        )

    shown = methods[chosen] if chosen else methods[target if target != "auto" else "qlora"]
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
        strategy=shown.strategy,
        margin=margin,
        usable_bytes=usable,
        requested_method=job.method,
        requested_batch_size=job.batch_size,
        requested_speed=job.speed,
        seq_len=job.seq_len,
        gradient_checkpointing=shown.speed != "fast",
        methods=methods,
        method=chosen,
        batch_size=methods[chosen].batch_size if chosen else None,
        speed=methods[chosen].speed if chosen else None,
        fits=chosen is not None,
        message=message,
        suggestions=suggestions,
        compute=compute,
    )


def _suggest(est, method: str, batch: int, speed: str, job: _Job, usable: int, gpus: int) -> list[dict[str, Any]]:
    """Single changes to the job that would make it fit, each with its estimate."""
    out: list[dict[str, Any]] = []

    def add(kind: str, value: Any, e: MemoryEstimate, text: str) -> None:
        out.append({"change": kind, "value": value, "total_bytes": e.total, "text": f"{text} ({_gib(e.total)})"})

    if speed == "fast":
        e = est(method, batch, speed="lean")
        if e.total <= usable:
            add("gradient_checkpointing", True, e, "speed lean (gradient_checkpointing true)")
    b = batch // 2
    while b >= 1:
        e = est(method, b, speed=speed)
        if e.total <= usable:
            add("batch_size", b, e, f"batch_size {b}")
            break
        b //= 2
    # Longest max_seq_len (a multiple of 64) that fits at this batch size, by bisection.
    lo, hi = 0, job.seq_len - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if est(method, batch, speed=speed, seq=max(8, mid // 64 * 64 or mid)).total <= usable:
            lo = mid
        else:
            hi = mid - 1
    if lo >= 8:
        s = lo // 64 * 64 or lo
        add("max_seq_len", s, est(method, batch, speed=speed, seq=s), f"max_seq_len {s}")
    if method in WHOLE_WEIGHT_METHODS:
        # Only sharding lowers the memory per GPU; DDP replicates everything.
        for k in (2, 4, 8, 16, 32, 64):
            if k <= gpus:
                continue
            e = est(method, batch, speed=speed, k=k, strat="fsdp")
            if e.total <= usable:
                add("gpus", k, e, f"{k} GPUs with FSDP full sharding")
                break
    ladder = METHODS[METHODS.index(method) + 1:] if method in METHODS else ("lora", "qlora")
    for m in ladder:
        e = est(m, batch, speed=speed)
        if e.total <= usable:
            add("method", m, e, f"method {m}")
            break
    if not out and speed == "fast":
        # Nothing single fits: try the strongest combination we can offer.
        e = est("qlora", 1, speed="lean")
        if e.total <= usable:
            add("combination", {"method": "qlora", "batch_size": 1, "gradient_checkpointing": True}, e,
                "method qlora with batch_size 1 and speed lean (gradient_checkpointing true)")
    return out
