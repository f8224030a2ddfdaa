"""A causal LM's shape, counted exactly from its config on the meta device (no weights).

The planner works from a transformers config alone, so that the API can plan a job before any
GPU is touched: every count here is of the real module tree transformers builds.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

GiB = 1024**3


def local_config(model_path: str) -> Any | None:
    """The transformers config of a local model directory; None for a hub id (not fetched here)."""
    path = Path(model_path)
    if not (path / "config.json").is_file():
        return None
    from transformers import AutoConfig

    # config.json only: no weights and no remote code are touched.
    return AutoConfig.from_pretrained(str(path), trust_remote_code=False)


def gib(n: float) -> str:
    """Bytes as the planner's messages show them."""
    return f"{n / GiB:.1f} GiB"


# Where a decoder layer's linear layers take their input from; linears in one group read the same
# tensor, so that tensor is saved once no matter how many of them need it.
ATTN_IN, ATTN_OUT, MLP_IN, MLP_MID = "attn_in", "attn_out", "mlp_in", "mlp_mid"


T = TypeVar("T")


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

    # Sizes the estimates ask for on every call, counted once per shape.
    @functools.cached_property
    def layer_matmul_params(self) -> int:
        """Matmul weights of one decoder layer (the first; they are alike)."""
        return sum(m.in_features * m.out_features for m in self.linears if m.layer == 0)

    @functools.cached_property
    def largest_decoder_matmul(self) -> int:
        return max((m.in_features * m.out_features for m in self.linears if m.layer is not None), default=0)

    @functools.cached_property
    def widest_decoder_input(self) -> int:
        return max((m.in_features for m in self.linears if m.layer is not None), default=self.hidden)

    @functools.cached_property
    def _memo(self) -> dict[Any, Any]:
        return {}

    def memo(self, key: Any, compute: Callable[[], T]) -> T:
        """`compute()`, once per shape and key: the planner asks the same shape the same question
        (which linears a LoRA set adapts, a quantised size) for every candidate it weighs."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def adapted_features(self, modules: frozenset[str]) -> dict[int | None, tuple[int, int]]:
        """Per decoder layer (None: outside the layers), (in + out, out) features summed over the
        linears named in `modules`: a LoRA of rank r adds r * (in + out) there, DoRA `out` more."""
        def count() -> dict[int | None, tuple[int, int]]:
            per: dict[int | None, tuple[int, int]] = {}
            for m in self.linears:
                if m.name in modules:
                    io, out = per.get(m.layer, (0, 0))
                    per[m.layer] = (io + m.in_features + m.out_features, out + m.out_features)
            return per
        return self.memo(("adapted_features", modules), count)

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
        return dict(self.groups).get(layer_suffix(linear.name))

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
        n = sum(lora_linear_params(r, io, out) for io, out in self.adapted_features(frozenset(chosen)).values())
        n += sum(r * (num + dim) for name, num, dim in self.embeddings if name in chosen)
        return n

    def to_dict(self) -> dict[str, Any]:
        per_suffix: dict[str, dict[str, int]] = {}
        for m in self.linears:
            key = layer_suffix(m.name) if m.layer is not None else m.name
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


def layer_suffix(name: str) -> str:
    """A decoder linear's name within its layer, e.g. "self_attn.q_proj"."""
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
    groups = tuple((layer_suffix(m.name), _group_for(layer_suffix(m.name), m, hidden, ffn)) for m in layer0)
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


def shape_of(config: Any) -> Shape:
    """A Shape as given, else counted from the config."""
    return config if isinstance(config, Shape) else model_shape(config)


def lora_linear_params(r: int, in_plus_out: int, out: int, use_dora: bool = False) -> int:
    """peft's A and B of adapted linears whose in + out features sum to `in_plus_out` and out
    features to `out`, and DoRA's magnitude vectors beside them."""
    return r * in_plus_out + (out if use_dora else 0)

