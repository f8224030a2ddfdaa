"""`tuneq submit`: a job from flags and/or a spec file, its local files uploaded first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from trainer.vocabulary import (DEFAULT_METHOD, METHOD_SETTINGS, METHODS, OBJECTIVES, PREFERENCE_OBJECTIVES,
                               extra_files, with_files)
from tuneq.cli.common import client, err, fail, friendly
from tuneq.cli.render import show_bad_lines
from tuneq.cli.watch import watch
from tuneq.client import Client

# --lora-r and --lora-alpha: the methods whose settings are LoRA's.
LORA_METHODS = tuple(m for m, fields in METHOD_SETTINGS.items() if fields[:1] == ("lora",))


def upload(c: Client, path: Path, what: str, uploaded: list[str] | None = None) -> str:
    """The id of `path` uploaded; `uploaded` collects the ids, refused uploads' too, so that a
    command that stops later can take them back (forget_uploads)."""
    if not path.is_file():
        raise fail(f"{what} {path}: no such file")
    f = c.upload_file(path)
    if uploaded is not None:
        uploaded.append(f["id"])
    if f.get("status") != "processed":
        show_bad_lines(path, f)
        raise fail(f"{path} was refused: {f.get('status_details') or 'validation failed'}")
    err.print(f"uploaded {path} as {f['id']} ({f.get('validation', {}).get('examples', '?')} examples)")
    return f["id"]


def forget_uploads(c: Client, uploaded: list[str]) -> None:
    """Delete what this command uploaded for a job that was not made: each would count towards
    the user's file quota. Best effort; the server refuses to delete a file a job uses."""
    for file_id in uploaded:
        try:
            c.delete_file(file_id)
        except Exception:  # noqa: BLE001 - the command's own error is the one to report
            err.print(f"could not delete the uploaded {file_id}; `tuneq files` lists it")


def finite_numbers(body: dict[str, Any]) -> None:
    """A refusal before anything is uploaded, for NaN or infinity anywhere in the body (JSON has neither)."""
    try:
        json.dumps(body, allow_nan=False)
    except ValueError:
        raise fail("a number of the job (--lr, --lora-alpha or one in --spec) is NaN or infinite; give finite "
                   "numbers") from None


def _load_spec(path: Path) -> dict[str, Any]:
    """A job body (as POST /v1/fine_tuning/jobs takes it) from a YAML or JSON file."""
    import yaml

    if not path.is_file():
        raise fail(f"--spec {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise fail(f"--spec {path}: not UTF-8 text (byte {exc.start})") from None
    try:
        spec = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise fail(f"--spec {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from None
    if not isinstance(spec, dict):
        raise fail(f"--spec {path}: must be a mapping of job fields (model, training_file, method, ...)")
    return spec


def _file_ref(c: Client, value: Any, field: str, base: Path, uploaded: list[str]) -> str:
    """A spec's file field: a local path (uploaded now, relative to the spec file) or a file id."""
    if not isinstance(value, str) or not value:
        raise fail(f"{field}: a path to a JSONL file or a file id (file-...), got {value!r}")
    path = Path(value) if Path(value).is_absolute() else base / value
    if path.is_file():
        return upload(c, path, field, uploaded)
    if value.startswith("file-"):
        return value
    raise fail(f"{field}: {path}: no such file (nor a file id)")


def _upload_spec_files(c: Client, body: dict[str, Any], base: Path, uploaded: list[str]) -> None:
    for field in ("training_file", "validation_file"):
        if body.get(field) is not None:
            body[field] = _file_ref(c, body[field], field, base, uploaded)
    body.update(with_files(body, {param: _file_ref(c, value, param, base, uploaded)
                                  for param, value, _ in extra_files(body)}))


def _method_name(method: Any) -> str | None:
    return method if isinstance(method, str) else method.get("type") if isinstance(method, dict) else None


def _preference_method(method: Any, objective: str, beta: str | None) -> dict[str, Any]:
    """The request's method as a preference objective's body: {type: objective, objective: {method,
    <settings fields>, hyperparameters: {beta}}}, from a method name or {type: name, name: settings}."""
    name = _method_name(method)
    body: dict[str, Any] = {}
    if name in METHODS:
        body["method"] = name
        settings = dict(method.get(name) or {}) if isinstance(method, dict) else {}
        own, *nested = METHOD_SETTINGS[name] or (None,)
        body.update({k: settings.pop(k) for k in nested if k in settings})
        if settings and own:
            body[own] = settings
    if beta is not None:
        try:
            body["hyperparameters"] = {"beta": beta if beta == "auto" else float(beta)}
        except ValueError:
            raise fail(f"--beta: a number or auto, got {beta!r}") from None
    return {"type": objective, objective: body}


def _with_wandb_project(integrations: Any, project: str) -> list[Any]:
    """A --spec's integrations with the wandb one's project set (the integration added if missing)."""
    given = list(integrations) if isinstance(integrations, list) else []
    for k, item in enumerate(given):
        if isinstance(item, dict) and item.get("type") == "wandb":
            given[k] = {**item, "wandb": {**(item.get("wandb") or {}), "project": project}}
            return given
    return [*given, {"type": "wandb", "wandb": {"project": project}}]


@friendly
def submit(
    file: Annotated[Path | None, typer.Argument(help="Training data: a JSONL file (uploaded first) or the id of an "
                    "uploaded one (or training_file in --spec).")] = None,
    spec: Annotated[Path | None, typer.Option("--spec", "-f", help="A job body as YAML or JSON (the fields of POST "
                    "/v1/fine_tuning/jobs); file fields may be local paths, uploaded first. Flags override it.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Base model (see `tuneq models`).")] = None,
    method: Annotated[str | None, typer.Option(help=" | ".join(METHODS) + f" (default {DEFAULT_METHOD}).")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Passes over the data.")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Optimizer steps (overrides --epochs).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Examples per micro-batch.")] = None,
    max_seq_len: Annotated[int | None, typer.Option("--max-seq-len", help="Tokens per example.")] = None,
    lora_r: Annotated[int | None, typer.Option("--lora-r", help="LoRA rank.")] = None,
    lora_alpha: Annotated[float | None, typer.Option("--lora-alpha", help="LoRA alpha.")] = None,
    objective: Annotated[str | None, typer.Option(help=" | ".join(OBJECTIVES) + ": sft learns the assistant's "
                         "answers; dpo, simpo and orpo learn preference lines (default sft).")] = None,
    beta: Annotated[str | None, typer.Option(help="dpo, simpo, orpo: beta, a number or auto (default auto).")] = None,
    validation_file: Annotated[Path | None, typer.Option("--validation-file", help="Validation JSONL (or file id).")] = None,
    eval_file: Annotated[Path | None, typer.Option("--eval-file", help="Eval JSONL (or file id) of prompts with "
                         "expected answers, scored at every checkpoint (eval.file; graders default to exact_match).")] = None,
    select_best: Annotated[bool, typer.Option("--select-best", help="Export the checkpoint with the best eval score "
                           "(export.select best).")] = False,
    wandb_project: Annotated[str | None, typer.Option("--wandb-project", help="Also write the curves as an offline "
                             "W&B run of this project (integrations: wandb), downloadable with `tuneq download JOB DIR "
                             "--wandb` for `wandb sync`.")] = None,
    suffix: Annotated[str | None, typer.Option(help="Added to the fine-tuned model's name.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of data order and init.")] = None,
    priority: Annotated[int | None, typer.Option(help="Higher runs first (default 0).")] = None,
    gpus: Annotated[int | None, typer.Option(help="GPUs the job needs on each host (default 1).")] = None,
    nodes: Annotated[int | None, typer.Option(help="Hosts the job spans, --gpus on each (default 1).")] = None,
    watch_it: Annotated[bool, typer.Option("--watch", help="Then follow it like `tuneq watch`.")] = False,
) -> None:
    """Upload the data, create a fine-tuning job and print its id."""
    if method is not None and method not in METHODS:
        raise fail(f"--method: must be one of {', '.join(METHODS)}, got {method!r}")
    body: dict[str, Any] = _load_spec(spec) if spec is not None else {}
    base = spec.resolve().parent if spec is not None else Path.cwd()
    name = method or _method_name(body.get("method")) or DEFAULT_METHOD
    if (lora_r is not None or lora_alpha is not None) and name not in LORA_METHODS:
        raise fail(f"--lora-r/--lora-alpha apply to --method {' or '.join(LORA_METHODS)}")
    if model is not None:
        body["model"] = model
    if not body.get("model"):
        raise fail("Missing option '--model' (or `model` in --spec)", 2)
    if file is None and body.get("training_file") is None:
        raise fail("Missing argument 'FILE': the training data (or `training_file` in --spec)", 2)
    hp = {k: v for k, v in {"n_epochs": epochs, "max_steps": max_steps, "learning_rate": lr, "batch_size": batch_size,
                            "max_seq_len": max_seq_len}.items() if v is not None}
    body["hyperparameters"] = {**(body.get("hyperparameters") or {}), **hp}
    lora = {k: v for k, v in {"r": lora_r, "alpha": lora_alpha}.items() if v is not None}
    current = body.get("method")
    if lora:
        settings = current.get(name, {}) if isinstance(current, dict) and current.get("type") == name else {}
        body["method"] = {"type": name, name: {**settings, **lora}}
    elif current is None or (method is not None and _method_name(current) != method):
        body["method"] = name  # a --spec's settings of the same method are kept
    if objective is not None and objective not in OBJECTIVES:
        raise fail(f"--objective: must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if objective in PREFERENCE_OBJECTIVES:
        body["method"] = _preference_method(body.get("method"), objective, beta)
    elif beta is not None:
        raise fail(f"--beta: applies to --objective {', '.join(PREFERENCE_OBJECTIVES)}")
    for key, value in (("suffix", suffix), ("seed", seed), ("priority", priority), ("gpus", gpus),
                       ("nodes", nodes)):
        if value is not None:
            body[key] = value
    if eval_file is not None:
        body["eval"] = {**(body.get("eval") or {}), "file": str(eval_file if eval_file.is_absolute()
                                                                 else Path.cwd() / eval_file)}
    if select_best:
        body["export"] = {**(body.get("export") or {}), "select": "best"}
    if wandb_project is not None:
        body["integrations"] = _with_wandb_project(body.get("integrations"), wandb_project)
    finite_numbers(body)
    uploaded: list[str] = []
    with client() as c:
        try:
            _upload_spec_files(c, body, base, uploaded)
            if file is not None:
                body["training_file"] = _file_ref(c, str(file), "training file", Path.cwd(), uploaded)
            if validation_file is not None:
                body["validation_file"] = _file_ref(c, str(validation_file), "validation file", Path.cwd(), uploaded)
            job = c.create_job(body)
        except BaseException:
            forget_uploads(c, uploaded)
            raise
    err.print(f"created {job['id']} ({job['status']}); follow it with `tuneq watch {job['id']}`")
    # Only the id on stdout, so that JOB=$(tuneq submit ...) works.
    print(job["id"], flush=True)
    if watch_it:
        watch(job["id"])
