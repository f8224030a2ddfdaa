"""The module names a model has, read from its config on the meta device, and the spec checks
that need them (target modules, layer counts).

The API runs these when a job is created, so a misspelled target module is a 400 naming the
modules the model does have, not a failed job minutes later on a GPU. Building the model on the
meta device allocates no weights: it costs milliseconds even for an 8B config.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.errors import ConfigError
from trainer.spec import JobSpec


@dataclass(frozen=True)
class ModelModules:
    linear: tuple[str, ...]  # last name part of each decoder linear layer, e.g. "q_proj"
    all_names: frozenset[str]  # every module's last name part, what peft matches a plain name against
    layers: int  # decoder layers


def _meta_model(config: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@functools.lru_cache(maxsize=32)
def _modules_of(config_json: str) -> ModelModules:
    from transformers import AutoConfig

    raw = json.loads(config_json)
    config = AutoConfig.for_model(**raw)
    model = _meta_model(config)
    return modules_of_model(model)


def modules_of_model(model: Any) -> ModelModules:
    import torch

    names: set[str] = set()
    linear: set[str] = set()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for full, module in model.named_modules():
        if not full:
            continue
        last = full.rsplit(".", 1)[-1]
        names.add(last)
        # The LM head is excluded as peft's "all-linear" excludes it: adapting the output layer is
        # almost never what is wanted and would make the adapter as large as the vocabulary.
        if module is not output and (isinstance(module, torch.nn.Linear) or type(module).__name__.startswith("Linear")):
            linear.add(last)
    layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    return ModelModules(linear=tuple(sorted(linear)), all_names=frozenset(names), layers=layers)


def model_modules(model_dir: str) -> ModelModules | None:
    """The modules of the model in `model_dir`; None when its config cannot be read here."""
    path = Path(model_dir) / "config.json"
    try:
        text = path.read_text()
    except OSError:
        return None  # a hub id: the trainer checks once it has the model
    # Keyed by the text, so a model directory replaced in place is read again.
    try:
        return _modules_of(json.dumps(json.loads(text), sort_keys=True))
    except Exception:  # noqa: BLE001 - an unknown architecture: leave it to the trainer
        return None


def _check_names(field: str, wanted: list[str], mods: ModelModules) -> None:
    missing = [n for n in wanted if n.rsplit(".", 1)[-1] not in mods.all_names]
    if missing:
        raise ConfigError(
            f"{field}: {', '.join(repr(n) for n in missing)} not in this model; "
            f"its linear modules are {', '.join(mods.linear)}"
        )


def check_against_model(spec: JobSpec, mods: ModelModules) -> None:
    """ConfigError naming the field when the spec asks for modules or layers the model lacks."""
    if spec.method in ("lora", "qlora") and isinstance(spec.lora.target_modules, list):
        _check_names("lora.target_modules", spec.lora.target_modules, mods)
    if spec.method == "ia3" and spec.ia3 is not None and spec.ia3.target_modules:
        _check_names("ia3.target_modules", spec.ia3.target_modules, mods)
    if spec.method == "freeze" and spec.freeze is not None and mods.layers and spec.freeze.trainable_layers > mods.layers:
        raise ConfigError(
            f"freeze.trainable_layers: {spec.freeze.trainable_layers} exceeds the model's {mods.layers} decoder "
            f"layers; allowed 1..{mods.layers} (use method 'full' to train all of it)"
        )


def check_spec_model(spec: JobSpec) -> None:
    """check_against_model for spec.model when its config is readable here."""
    mods = model_modules(spec.model)
    if mods is not None:
        check_against_model(spec, mods)
