"""The models an inference server keeps loaded: each base once, many adapters over it.

A base model is loaded once per process. LoRA-family adapters of that base are attached to it
with peft under their own names (PeftModel.load_adapter) and switched with set_adapter, so ten
fine-tuned models of one 8B base cost one base and ten small adapters; the base itself answers
with the adapters switched off (disable_adapter). The adapters of a base are kept in LRU order
and the oldest is deleted past `max_adapters`. What cannot share a base — a full or freeze
model, an adapter of another peft type than the one the base wears already — is loaded as a
model of its own, in a second LRU of `max_models`.

Nothing here knows about Redis or the database: `lease` takes local directories.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Weights:
    """Trained weights to put on a base: a directory with adapter_config.json (an adapter),
    config.json (a whole model) or model.safetensors alone (a full fine-tuning checkpoint)."""

    key: str  # a job or checkpoint id: names the adapter in the cache
    path: Path

    @property
    def is_adapter(self) -> bool:
        return (self.path / "adapter_config.json").is_file()

    @property
    def peft_type(self) -> str | None:
        if not self.is_adapter:
            return None
        return str(json.loads((self.path / "adapter_config.json").read_text()).get("peft_type", "LORA"))


@dataclass
class _Base:
    model: Any  # the base model, or the PeftModel wrapping it once an adapter came
    tokenizer: Any
    peft_type: str | None = None
    adapters: OrderedDict[str, None] = field(default_factory=OrderedDict)


# Adapter types that peft stacks by name in one PeftModel and can switch off for the base.
SHARED_TYPES = {"LORA", "IA3", "LOHA", "LOKR", "ADALORA"}


def _load_base(path: str, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    from trainer.model import remote_code_allowed

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                 trust_remote_code=remote_code_allowed(path))
    return model.to(device).train(False)


class ModelCache:
    def __init__(self, device: torch.device | None = None, dtype: torch.dtype | None = None,
                 max_adapters: int = 8, max_models: int = 2, load_base: Callable[..., Any] | None = None):
        self.device = device or torch.device("cpu")
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.max_adapters = max_adapters
        self.max_models = max_models
        self._load = load_base or _load_base
        self.bases: OrderedDict[str, _Base] = OrderedDict()
        self.models: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
        self.loads: list[str] = []  # what was loaded from disk, in order: bases and own models
        self.lock = threading.Lock()

    def _tokenizer(self, base: str) -> Any:
        from trainer.model import load_tokenizer

        return load_tokenizer(base)

    def _base(self, base: str) -> _Base:
        entry = self.bases.get(base)
        if entry is None:
            self.loads.append(base)
            entry = self.bases[base] = _Base(self._load(base, self.device, self.dtype), self._tokenizer(base))
        self.bases.move_to_end(base)
        return entry

    @contextmanager
    def lease(self, base: str, weights: Weights | None = None) -> Iterator[tuple[Any, Any]]:
        """(model, tokenizer) answering as `base` with `weights` on it, for one generation.

        One lease at a time per cache: the shared base has one active adapter."""
        with self.lock:
            if weights is None:
                entry = self._base(base)
                off = entry.model.disable_adapter() if entry.peft_type else nullcontext()
                with off, torch.inference_mode():
                    yield entry.model, entry.tokenizer
                return
            if weights.is_adapter:
                entry = self._base(base)
                if entry.peft_type in (None, weights.peft_type) and weights.peft_type in SHARED_TYPES:
                    self._activate(entry, weights)
                    with torch.inference_mode():
                        yield entry.model, entry.tokenizer
                    return
            model, tokenizer = self._own_model(base, weights)
            with torch.inference_mode():
                yield model, tokenizer

    def _activate(self, entry: _Base, weights: Weights) -> None:
        from peft import PeftModel

        name = weights.key
        if name not in entry.adapters:
            if entry.peft_type is None:
                entry.model = PeftModel.from_pretrained(entry.model, str(weights.path), adapter_name=name)
                entry.peft_type = weights.peft_type
            else:
                entry.model.load_adapter(str(weights.path), adapter_name=name)
            entry.model.train(False)
            entry.adapters[name] = None
        entry.adapters.move_to_end(name)
        entry.model.set_adapter(name)
        while len(entry.adapters) > self.max_adapters:
            oldest = next(iter(entry.adapters))
            entry.model.delete_adapter(oldest)
            del entry.adapters[oldest]

    def _own_model(self, base: str, weights: Weights) -> tuple[Any, Any]:
        if weights.key not in self.models:
            self.loads.append(weights.key)
            self.models[weights.key] = (self._load_own(base, weights), self._tokenizer(base))
            while len(self.models) > self.max_models:
                self.models.popitem(last=False)
        self.models.move_to_end(weights.key)
        return self.models[weights.key]

    def _load_own(self, base: str, weights: Weights) -> Any:
        if (weights.path / "config.json").is_file():  # a full or freeze job's final model
            return self._load(str(weights.path), self.device, self.dtype)
        model = self._load(base, self.device, self.dtype)
        if weights.is_adapter:  # an adapter type that cannot share the base
            from peft import PeftModel

            return PeftModel.from_pretrained(model, str(weights.path)).train(False)
        # A full fine-tuning checkpoint: the base's shape with the checkpoint's weights.
        from trainer.checkpoint import load_weights

        load_weights(model, weights.path, self.device)
        return model

    def stats(self) -> dict[str, Any]:
        return {"bases": list(self.bases), "adapters": {b: list(e.adapters) for b, e in self.bases.items()},
                "models": list(self.models), "loads": list(self.loads)}
