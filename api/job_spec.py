"""From an OpenAI-shaped job request to a trainer.spec.JobSpec.

OpenAI clients send `hyperparameters` at the top level (older SDKs) or inside
`method.supervised.hyperparameters`, with `learning_rate_multiplier` instead of a learning rate
and "auto" for defaults. tuneq adds the method (any of the spec's) and its settings in the same
`{type, <type>: {...}}` pattern, and the spec's other fields at the top level. All of it ends in
one JobSpec, whose checks are the only range checks; their errors are reported under the path
the user wrote.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from api.errors import APIError, bad_request, first_validation_error
from api.schemas import SPEC_FIELDS, CreateJobRequest
from trainer.errors import ConfigError
from trainer.modules import check_spec_model
from trainer.spec import (
    DEFAULT_METHOD,
    METHOD_SETTINGS,
    METHODS,
    PREFERENCE_OBJECTIVES,
    WHOLE_WEIGHT_METHODS,
    JobSpec,
    PreferenceSettings,
)

# learning_rate_multiplier scales these; full fine-tuning needs a much smaller step than adapters.
# IA3's scaling vectors and prefix tuning's virtual tokens are few and start neutral: they need
# far larger steps than LoRA; freeze trains whole layers like full fine-tuning.
BASE_LEARNING_RATE = {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5, "freeze": 2e-5, "ia3": 3e-3, "prefix": 3e-3}
_METHOD_LIST = ", ".join(repr(m) for m in METHODS)
# A method body's settings: its own settings field's (`lora` for lora and qlora), or, for a
# key naming another of its settings fields (qlora's `quantization`), that field.
_OWN = {name for names in METHOD_SETTINGS.values() for name in names[:1]}
_NESTED = {name for names in METHOD_SETTINGS.values() for name in names[1:]}
# OpenAI lets these three be "auto": tuneq's defaults then apply.
AUTO_FIELDS = ("n_epochs", "batch_size", "learning_rate_multiplier")
# method "auto": the planner picks full, lora or qlora by what fits (trainer.planning.choose_method).
AUTO_METHOD = "auto"
# The method.type values that name an objective rather than a method: OpenAI's supervised (sft)
# and dpo, and tuneq's simpo and orpo. Their body may name the method ("method") and its settings
# under the spec's field names; the preference settings ride in their hyperparameters.
OBJECTIVE_TYPES = {"supervised": "sft", **{name: name for name in PREFERENCE_OBJECTIVES}}
PREFERENCE_HYPERPARAMETERS = tuple(PreferenceSettings.model_fields)
# A preference objective moves a model that already answers the task: its learning rates start at
# this share of the method's (learning_rate_multiplier scales those).
PREFERENCE_LR_SHARE = 0.1
# (JobSpec-shaped draft whose method and/or batch_size may be "auto") -> (method, batch_size).
Chooser = Callable[[dict[str, Any]], tuple[str, int | None]]


@dataclass
class _Method:
    name: str | None = None  # None: the request did not choose; the spec's default applies
    type_key: str | None = None  # the key the user wrote, e.g. "supervised" or "qlora"
    lora: dict[str, Any] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    objective: str | None = None  # None: not an objective type; the spec's default (sft)
    preference: dict[str, Any] = field(default_factory=dict)


def base_learning_rate(method: str, objective: str = "sft") -> float:
    rate = BASE_LEARNING_RATE.get(method, BASE_LEARNING_RATE[DEFAULT_METHOD])
    return rate * PREFERENCE_LR_SHARE if objective in PREFERENCE_OBJECTIVES else rate


def _objective_method(kind: str, body: dict[str, Any], hyper: dict[str, Any]) -> _Method:
    """An objective type's body: {'method': name, <settings field>: {...}} beside its hyperparameters."""
    name = body.pop("method", None)
    if name is not None and (not isinstance(name, str) or (name not in METHODS and name != AUTO_METHOD)):
        raise bad_request(f"method.{kind}.method: must be one of {_METHOD_LIST} or 'auto', got {name!r}",
                          f"method.{kind}.method")
    allowed = METHOD_SETTINGS.get(name or DEFAULT_METHOD, ("lora",) if name == AUTO_METHOD else ())
    for key, value in body.items():
        if key not in allowed:
            hint = f"allowed: method{''.join(', ' + a for a in allowed)}"
            raise bad_request(f"method.{kind}.{key}: unknown field ({hint})", f"method.{kind}.{key}")
        if not isinstance(value, dict):
            raise bad_request(f"method.{kind}.{key}: must be an object", f"method.{kind}.{key}")
    own = allowed[0] if allowed else None
    settings = {**body.get(own, {}), **{k: v for k, v in body.items() if k != own}} if own else {}
    if name is None and settings:
        name = DEFAULT_METHOD  # settings name no method: they are the default method's
    objective = OBJECTIVE_TYPES[kind]
    preference = {k: hyper.pop(k) for k in PREFERENCE_HYPERPARAMETERS if k in hyper} if objective != "sft" else {}
    return _Method(name=name, type_key=kind, lora=settings, hyperparameters=hyper, objective=objective,
                   preference=preference)


def _parse_method(raw: str | dict[str, Any] | None) -> _Method:
    if raw is None:
        return _Method()
    if isinstance(raw, str):
        if raw not in METHODS and raw != AUTO_METHOD:
            raise bad_request(f"method: must be one of {_METHOD_LIST} or 'auto', got {raw!r}", "method")
        return _Method(name=raw, type_key=raw)
    kind = raw.get("type")
    types = ", ".join(repr(t) for t in OBJECTIVE_TYPES)
    if kind is None:
        raise bad_request(f"method.type: required ({types} or one of {_METHOD_LIST})", "method.type")
    if kind == "reinforcement":
        raise bad_request(f"method.type: {kind!r} is not supported by tuneq; use {types} or one of {_METHOD_LIST}",
                          "method.type")
    if kind not in OBJECTIVE_TYPES and kind not in METHODS and kind != AUTO_METHOD:
        raise bad_request(f"method.type: must be {types} or one of {_METHOD_LIST}, got {kind!r}", "method.type")
    for key in raw:
        if key not in ("type", kind):
            raise bad_request(f"method.{key}: not allowed with method.type {kind!r}", f"method.{key}")
    body = raw.get(kind) or {}
    if not isinstance(body, dict):
        raise bad_request(f"method.{kind}: must be an object", f"method.{kind}")
    body = dict(body)
    hyper = body.pop("hyperparameters", None) or {}
    if not isinstance(hyper, dict):
        raise bad_request(f"method.{kind}.hyperparameters: must be an object", f"method.{kind}.hyperparameters")
    if kind in OBJECTIVE_TYPES:
        return _objective_method(kind, body, dict(hyper))
    return _Method(name=kind, type_key=kind, lora=body, hyperparameters=hyper)


def _merge_hyperparameters(req: CreateJobRequest, method: _Method) -> dict[str, Any]:
    top = dict(req.hyperparameters or {})
    merged = dict(top)
    for key, value in method.hyperparameters.items():
        if key in top and top[key] != value:
            raise bad_request(
                f"method.{method.type_key}.hyperparameters.{key}: conflicts with hyperparameters.{key}; give it once",
                f"method.{method.type_key}.hyperparameters.{key}",
            )
        merged[key] = value
    if req.seed is not None:
        if "seed" in merged and merged["seed"] != req.seed:
            raise bad_request("seed: conflicts with hyperparameters.seed; give it once", "seed")
        merged["seed"] = req.seed
    for key in AUTO_FIELDS:
        if merged.get(key) == "auto":
            del merged[key]
    return merged


def _apply_multiplier(hp: dict[str, Any], method: str, param: str, objective: str = "sft") -> None:
    if "learning_rate_multiplier" not in hp:
        hp.setdefault("learning_rate", base_learning_rate(method, objective))
        return
    mult = hp.pop("learning_rate_multiplier")
    if "learning_rate" in hp:
        raise bad_request(f"{param}: give learning_rate or learning_rate_multiplier, not both", param)
    if isinstance(mult, bool) or not isinstance(mult, int | float) or not mult > 0:
        raise bad_request(f"{param}: must be a number greater than 0, got {mult!r}", param)
    hp["learning_rate"] = mult * base_learning_rate(method, objective)


def _method_fields(method: _Method) -> dict[str, Any]:
    """Spec fields of the method body: its own settings under their field, nested ones under theirs."""
    body = dict(method.lora)
    if not body or method.name is None:
        return {}
    own, *nested = METHOD_SETTINGS[method.name] or (None,)
    fields = {k: body.pop(k) for k in nested if k in body}
    if body and own is None:
        where = f"method.{method.type_key}"
        raise bad_request(f"{where}: method {method.name!r} takes no settings besides hyperparameters, got "
                          f"{', '.join(sorted(body))}", where)
    return {**fields, **({own: body} if body else {})}


def method_view(spec: dict[str, Any], hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """A stored spec's `method` as jobs show it, in OpenAI's shape: {type: 'supervised' (or the
    preference objective), <type>: {method: <method>, <settings fields>, hyperparameters}}. It
    reads back as the same method in a creation request (_objective_method)."""
    name, objective = spec["method"], spec.get("objective") or "sft"
    kind = objective if objective in PREFERENCE_OBJECTIVES else "supervised"
    body: dict[str, Any] = {"method": name}
    body.update({k: spec[k] for k in METHOD_SETTINGS.get(name, ()) if spec.get(k)})
    preference = {k: v for k, v in (spec.get("preference") or {}).items() if v is not None}
    body["hyperparameters"] = {**hyperparameters, **(preference if kind != "supervised" else {})}
    return {"type": kind, kind: body}


def _draft_method_fields(method: _Method) -> dict[str, Any]:
    """The method body of a draft: under `lora` while the method is still "auto"."""
    if method.name == AUTO_METHOD:
        return {"lora": method.lora} if method.lora else {}
    return _method_fields(method)


def _request_fields(req: CreateJobRequest, inherited: dict[str, Any] | None, init_from: str | None) -> dict[str, Any]:
    """Spec fields besides the method and hyperparameters: inherited ones, then the request's own."""
    fields = {k: v for k, v in (inherited or {}).items() if k != "method"}
    if init_from is not None:
        fields["init_from"] = init_from
    given = {name: getattr(req, name) for name in ("validation_file", *SPEC_FIELDS)}
    fields.update({k: v for k, v in given.items() if v is not None})
    return fields


def _asked_auto_batch(req: CreateJobRequest, method: _Method) -> bool:
    return "auto" in ((req.hyperparameters or {}).get("batch_size"), method.hyperparameters.get("batch_size"))


# OpenAI's limits on a job's metadata.
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512


def check_metadata(metadata: dict[str, str] | None) -> None:
    """400 naming `metadata` (or the key at fault) beyond OpenAI's limits; the types pydantic checked."""
    if not metadata:
        return
    if len(metadata) > METADATA_PAIRS:
        raise bad_request(f"metadata: at most {METADATA_PAIRS} key-value pairs, got {len(metadata)}", "metadata")
    for key, value in metadata.items():
        if not key or len(key) > METADATA_KEY_CHARS:
            raise bad_request(f"metadata: keys are 1 to {METADATA_KEY_CHARS} characters, got {len(key)} "
                              f"({key[:20]!r}{'…' if len(key) > 20 else ''})", "metadata")
        if len(value) > METADATA_VALUE_CHARS:
            raise bad_request(f"metadata.{key}: values are at most {METADATA_VALUE_CHARS} characters, got "
                              f"{len(value)}", f"metadata.{key}")


def _multiplier_param(method: _Method, hp_from_method: set[str]) -> str:
    """Where the request wrote learning_rate_multiplier."""
    if "learning_rate_multiplier" in hp_from_method:
        return f"method.{method.type_key}.hyperparameters.learning_rate_multiplier"
    return "hyperparameters.learning_rate_multiplier"


def _spec_or_400(data: dict[str, Any], req: CreateJobRequest, method: _Method, hp_from_method: set[str]) -> JobSpec:
    """JobSpec of `data`, or a 400 naming the field as the request wrote it."""
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        message, param = first_validation_error(exc.errors())
        user_param = _user_path(param, method, hp_from_method)
        if param == "hyperparameters.seed" and req.seed is not None and "seed" not in (req.hyperparameters or {}):
            user_param = "seed"

        if param and user_param != param:
            message = message.replace(param, user_param, 1)
        raise APIError(400, message, param=user_param, code="invalid_value") from None


def _check_hyperparameters(draft: dict[str, Any], req: CreateJobRequest, method: _Method, hp_from_method: set[str],
                           auto_batch: bool) -> None:
    """The spec's own range checks of the hyperparameters, before the planner chooses from them:
    it would otherwise plan a batch of 0 or a sequence of a billion tokens and answer in its own
    terms. Checked as the default method; the method's own rules wait for the chosen one."""
    hp = {k: v for k, v in draft["hyperparameters"].items() if not (auto_batch and k == "batch_size")}
    name = draft["method"] if draft["method"] != AUTO_METHOD else DEFAULT_METHOD
    try:
        _apply_multiplier(hp, name, _multiplier_param(method, hp_from_method), method.objective or "sft")
        _spec_or_400({**draft, "method": name, "hyperparameters": hp}, req, method, hp_from_method)
    except APIError as exc:
        if (exc.param or "").startswith(("hyperparameters.", f"method.{method.type_key}.hyperparameters.", "seed")):
            raise
    # Anything else (a rule of one method) is checked on the spec of the method chosen.


def build_spec(
    req: CreateJobRequest, *, model_path: str, init_from: str | None = None, inherited: dict[str, Any] | None = None,
    choose: Chooser | None = None,
) -> JobSpec:
    """The JobSpec of a request whose model and files were already resolved; APIError if invalid.

    init_from: the job or checkpoint id this job continues from (the worker makes it a path);
    inherited: the method fields of that job, used when the request names no method;
    choose: resolves method "auto" and batch_size "auto" (the planner); without it batch_size
    "auto" is the spec's default and method "auto" is refused.
    """
    check_metadata(req.metadata)
    method = _parse_method(req.method)
    hp = _merge_hyperparameters(req, method)
    hp_from_method = set(method.hyperparameters)
    if req.method is None and inherited:
        method = _Method(name=inherited["method"], type_key=inherited["method"], hyperparameters=method.hyperparameters)
    elif method.name is None and method.objective and inherited:
        method.name = inherited["method"]  # preference tuning of a supervised job: its method
    objective = {"objective": method.objective} if method.objective else {}
    if method.preference:
        objective["preference"] = method.preference
    rest = _request_fields(req, inherited if req.method is None else None, init_from)
    if choose is not None and (method.name == AUTO_METHOD or _asked_auto_batch(req, method)):
        auto_batch = _asked_auto_batch(req, method)
        # The whole job as asked, "auto" included, so the plan that chooses is the job's plan.
        draft: dict[str, Any] = {
            "model": model_path, "training_file": req.training_file, "method": method.name or DEFAULT_METHOD,
            "hyperparameters": {**hp, "batch_size": "auto"} if auto_batch else dict(hp),
            **_draft_method_fields(method), **objective, **rest,
        }
        _check_hyperparameters(draft, req, method, hp_from_method, auto_batch)
        chosen, batch = choose(draft)
        method.name = chosen
        if auto_batch and batch is not None:
            hp["batch_size"] = batch
    if method.name == AUTO_METHOD:
        raise bad_request("method: 'auto' needs a model whose config the planner can read (a local model)", "method")
    name = method.name or DEFAULT_METHOD
    _apply_multiplier(hp, name, _multiplier_param(method, hp_from_method), method.objective or "sft")

    data: dict[str, Any] = {"model": model_path, "method": name, "training_file": req.training_file, "hyperparameters": hp}
    data.update(_method_fields(method))
    data.update(objective)
    data.update(rest)
    spec = _spec_or_400(data, req, method, hp_from_method)
    ranks = spec.ranks(req.gpus)
    if spec.optimizer_in_backward and ranks > 1:
        # The spec cannot see the GPU count; the trainer would refuse it only once the job runs.
        raise bad_request(f"optimizer_in_backward: runs on one GPU, this job asks for {ranks}; give gpus 1 and nodes 1 "
                          "or optimizer_in_backward false", "optimizer_in_backward")
    if spec.objective == "dpo" and spec.method in WHOLE_WEIGHT_METHODS and ranks > 1 and spec.strategy == "auto":
        # auto would shard full fine-tuning over several GPUs, which DPO's frozen reference cannot be.
        raise bad_request(f"strategy: DPO of method {spec.method!r} on {ranks} GPUs needs strategy 'ddp' (auto "
                          "would shard it with fsdp, which keeps no whole reference copy)", "strategy")
    try:
        check_spec_model(spec)  # module names of a meta-device model: no weights are read
    except ConfigError as exc:
        param = exc.message.split(":", 1)[0]
        user_param = _user_path(param, method, hp_from_method)
        raise APIError(400, exc.message.replace(param, user_param or param, 1), param=user_param,
                       code="invalid_value") from None
    return spec


def _user_path(param: str | None, method: _Method, hp_from_method: set[str]) -> str | None:
    """Name the field as the request wrote it: spec 'lora.r' came from 'method.lora.r'."""
    if not param:
        return param
    head, _, rest = param.partition(".")
    if method.objective and method.type_key:  # the objective shape names the spec's own fields
        if head == "preference":
            return f"method.{method.type_key}.hyperparameters.{rest}" if rest else f"method.{method.type_key}"
        if head in _OWN | _NESTED:
            return f"method.{method.type_key}.{param}"
        if head == "method":
            return f"method.{method.type_key}.method"
    if head in _OWN | _NESTED and method.type_key:
        inner = param if head in _NESTED else rest
        return f"method.{method.type_key}" + (f".{inner}" if inner else "")
    if head == "hyperparameters" and rest.split(".")[0] in hp_from_method:
        return f"method.{method.type_key}.{param}"
    if head == "method" and isinstance(method.type_key, str) and method.type_key != method.name:
        return "method.type"
    return param
