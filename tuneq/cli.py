"""`tuneq`: submit a fine-tuning job, follow it, download its result, or run the whole stack here.

Every failure a user can cause or meet (a bad file, an unreachable server, a refused job) ends in
one line on stderr and a non-zero exit; a traceback would only hide the message.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from tuneq import config
from tuneq.client import APIError, Client, TuneqError

F = TypeVar("F", bound=Callable[..., Any])

METHODS = ("lora", "qlora", "full")
# Archive names of worker/artifacts.py: one tar.gz of the job's final/ directory.
ARCHIVES = ("adapter.tar.gz", "model.tar.gz")
BAD_LINES_SHOWN = 20

out = Console()
err = Console(stderr=True, soft_wrap=True)


class _OneLineErrors(TyperGroup):
    """Usage errors as one `error: ...` line instead of a framed panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: ANN001, ANN201
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:  # click's usage errors, vendored by typer
            if type(exc).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
                typer.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
            rv = exc.exit_code
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            rv = 130
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    help="tuneq: self-hosted LLM fine-tuning. Talks to the API at $TUNEQ_URL (or `url` in ~/.config/tuneq/config.toml, "
    "default http://127.0.0.1:8000) with the key $TUNEQ_API_KEY (or `api_key` there).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    return typer.Exit(code)


def friendly(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.TyperException, typer.Abort):
            raise
        except APIError as exc:
            where = f" ({exc.param})" if exc.param and exc.param not in str(exc) else ""
            raise fail(f"{exc}{where}") from None
        except (TuneqError, config.ConfigError) as exc:
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except OSError as exc:
            raise fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - the user gets one line; the detail is the type
            raise fail(f"unexpected {type(exc).__name__}: {exc}") from None

    return wrapper  # type: ignore[return-value]


def make_client() -> Client:
    return Client()


def _when(t: int | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return datetime.fromtimestamp(t).strftime(fmt) if t else "-"


# ------------------------------------------------------------------------------------------ submit


def _show_bad_lines(path: Path, f: dict[str, Any]) -> None:
    report = f.get("validation") or {}
    errors = report.get("errors") or []
    counts = report.get("error_counts") or {}
    total = sum(counts.values()) or len(errors)
    table = Table(title=f"{path}: {total} bad line{'s' if total != 1 else ''}", title_justify="left")
    table.add_column("line", justify="right")
    table.add_column("problem")
    table.add_column("detail", overflow="fold")
    for e in errors[:BAD_LINES_SHOWN]:
        table.add_row(str(e.get("line")), str(e.get("code")), str(e.get("message")))
    err.print(table)
    if total > BAD_LINES_SHOWN:
        err.print(f"... and {total - BAD_LINES_SHOWN} more")


def _upload(c: Client, path: Path, what: str) -> str:
    if not path.is_file():
        raise fail(f"{what} {path}: no such file")
    f = c.upload_file(path)
    if f.get("status") != "processed":
        _show_bad_lines(path, f)
        raise fail(f"{path} was refused: {f.get('status_details') or 'validation failed'}")
    err.print(f"uploaded {path} as {f['id']} ({f.get('validation', {}).get('examples', '?')} examples)")
    return f["id"]


def _load_spec(path: Path) -> dict[str, Any]:
    """A job body (as POST /v1/fine_tuning/jobs takes it) from a YAML or JSON file."""
    import yaml

    if not path.is_file():
        raise fail(f"--spec {path}: no such file")
    text = path.read_text()
    try:
        spec = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise fail(f"--spec {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from None
    if not isinstance(spec, dict):
        raise fail(f"--spec {path}: must be a mapping of job fields (model, training_file, method, ...)")
    return spec


def _file_ref(c: Client, value: Any, field: str, base: Path) -> str:
    """A spec's file field: a local path (uploaded now, relative to the spec file) or a file id."""
    if not isinstance(value, str) or not value:
        raise fail(f"{field}: a path to a JSONL file or a file id (file-...), got {value!r}")
    path = Path(value) if Path(value).is_absolute() else base / value
    if path.is_file():
        return _upload(c, path, field)
    if value.startswith("file-"):
        return value
    raise fail(f"{field}: {path}: no such file (nor a file id)")


def _upload_spec_files(c: Client, body: dict[str, Any], base: Path) -> None:
    for field in ("training_file", "validation_file", "forgetting_file"):
        if body.get(field) is not None:
            body[field] = _file_ref(c, body[field], field, base)
    for k, source in enumerate(body.get("mix") or []):
        if isinstance(source, dict) and "file" in source:
            source["file"] = _file_ref(c, source["file"], f"mix[{k}].file", base)


def _method_name(method: Any) -> str | None:
    return method if isinstance(method, str) else method.get("type") if isinstance(method, dict) else None


@app.command()
@friendly
def submit(
    file: Annotated[Path | None, typer.Argument(help="Training data: a JSONL file (uploaded first) or the id of an "
                    "uploaded one (or training_file in --spec).")] = None,
    spec: Annotated[Path | None, typer.Option("--spec", "-f", help="A job body as YAML or JSON (the fields of POST "
                    "/v1/fine_tuning/jobs); file fields may be local paths, uploaded first. Flags override it.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Base model (see `tuneq models`).")] = None,
    method: Annotated[str | None, typer.Option(help="lora | qlora | full (default lora).")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Passes over the data.")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Optimizer steps (overrides --epochs).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Examples per micro-batch.")] = None,
    max_seq_len: Annotated[int | None, typer.Option("--max-seq-len", help="Tokens per example.")] = None,
    lora_r: Annotated[int | None, typer.Option("--lora-r", help="LoRA rank.")] = None,
    lora_alpha: Annotated[float | None, typer.Option("--lora-alpha", help="LoRA alpha.")] = None,
    validation_file: Annotated[Path | None, typer.Option("--validation-file", help="Validation JSONL (or file id).")] = None,
    suffix: Annotated[str | None, typer.Option(help="Added to the fine-tuned model's name.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of data order and init.")] = None,
    priority: Annotated[int | None, typer.Option(help="Higher runs first (default 0).")] = None,
    gpus: Annotated[int | None, typer.Option(help="GPUs the job needs (default 1).")] = None,
    watch_it: Annotated[bool, typer.Option("--watch", help="Then follow it like `tuneq watch`.")] = False,
) -> None:
    """Upload the data, create a fine-tuning job and print its id."""
    if method is not None and method not in METHODS:
        raise fail(f"--method: must be one of {', '.join(METHODS)}, got {method!r}")
    body: dict[str, Any] = _load_spec(spec) if spec is not None else {}
    base = spec.resolve().parent if spec is not None else Path.cwd()
    name = method or _method_name(body.get("method")) or "lora"
    if name == "full" and (lora_r is not None or lora_alpha is not None):
        raise fail("--lora-r/--lora-alpha apply to --method lora or qlora")
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
    elif method is not None or current is None:
        body["method"] = name
    for key, value in (("suffix", suffix), ("seed", seed), ("priority", priority), ("gpus", gpus)):
        if value is not None:
            body[key] = value
    with make_client() as c:
        _upload_spec_files(c, body, base)
        if file is not None:
            body["training_file"] = _file_ref(c, str(file), "training file", Path.cwd())
        if validation_file is not None:
            body["validation_file"] = _file_ref(c, str(validation_file), "validation file", Path.cwd())
        job = c.create_job(body)
    err.print(f"created {job['id']} ({job['status']}); follow it with `tuneq watch {job['id']}`")
    # Only the id on stdout, so that JOB=$(tuneq submit ...) works.
    print(job["id"], flush=True)
    if watch_it:
        watch(job["id"])


# ------------------------------------------------------------------------------------------ plan

_PARTS = ("weights", "gradients", "optimizer_states", "activations", "logits", "overhead", "total")


@app.command()
@friendly
def plan(
    file: Annotated[Path, typer.Argument(help="Training data: chat JSONL, one example per line.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Base model (see `tuneq models`).")],
    method: Annotated[str, typer.Option(help="auto | lora | qlora | full.")] = "auto",
    batch_size: Annotated[str | None, typer.Option("--batch-size", help="Examples per micro-batch, or auto.")] = None,
    max_seq_len: Annotated[int | None, typer.Option("--max-seq-len", help="Tokens per example.")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Passes over the data.")] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing")] = None,
    gpus: Annotated[int, typer.Option(help="GPUs the job would get.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole plan as JSON.")] = False,
) -> None:
    """Upload FILE and show how much GPU memory each method needs, what fits, and how long it takes."""
    if method not in (*METHODS, "auto"):
        raise fail(f"--method: must be auto or one of {', '.join(METHODS)}, got {method!r}")
    hp: dict[str, Any] = {k: v for k, v in {"n_epochs": epochs, "max_seq_len": max_seq_len}.items() if v is not None}
    if batch_size is not None:
        if batch_size != "auto" and not batch_size.isdigit():
            raise fail(f"--batch-size: a positive integer or auto, got {batch_size!r}")
        hp["batch_size"] = batch_size if batch_size == "auto" else int(batch_size)
    with make_client() as c:
        body: dict[str, Any] = {"model": model, "training_file": _upload(c, file, "training file"), "method": method,
                                "hyperparameters": hp, "gpus": gpus}
        if gradient_checkpointing is not None:
            body["gradient_checkpointing"] = gradient_checkpointing
        got = c.plan_job(body)
    if as_json:
        import json

        print(json.dumps(got, indent=2))
        return
    p = got["plan"]
    table = Table(title=f"{model}: {p['model']['params'] / 1e9:.3g}B params, {p['gpus']} x {p['available_gib']:g} GiB "
                        f"(usable {p['usable_bytes'] / 2**30:.1f} GiB), max_seq_len {p['seq_len']}")
    table.add_column("method")
    table.add_column("batch", justify="right")
    for part in _PARTS:
        table.add_column(part.replace("_states", "").replace("_", " "), justify="right")
    table.add_column("fits")
    for name, mp in p["methods"].items():
        gib = mp["estimate"]["breakdown_gib"]
        table.add_row(name, str(mp["batch_size"] or "-"), *(f"{gib[k]:.2f}" for k in _PARTS), "yes" if mp["fits"] else "no")
    out.print(table)
    for note in p.get("notes", []):
        out.print(f"note: {note}")
    rec = got["recommendation"]
    out.print(("recommended: " if rec["fits"] else "refused: ") + rec["message"])
    t = got["time"]
    if t["seconds"] is not None:
        out.print(f"time: {t['dataset_tokens']} tokens, {t['flops']:.3g} FLOPs, {t['seconds'] / 3600:.2f} h, "
                  f"{t['gpu_hours']:.3g} GPU-hours")
    if not rec["fits"]:
        raise typer.Exit(2)


# ------------------------------------------------------------------------------------------ status

TERMINAL = ("succeeded", "failed", "cancelled")
# `tuneq watch` exits with the job's outcome, so scripts can chain on it.
EXIT_CODES = {"succeeded": 0, "failed": 1, "cancelled": 3}
LOSS_KEYS = ("train_loss", "valid_loss", "valid_mean_token_accuracy", "full_valid_loss", "full_valid_mean_token_accuracy")


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _progress(job: dict[str, Any]) -> str:
    p = job.get("progress") or {}
    step, total = p.get("step"), p.get("total_steps")
    if job.get("status") == "queued" and p.get("queue_position"):
        return f"queued #{p['queue_position']}"
    if step is None:
        return "-"
    return f"step {step}/{total}" if total else f"step {step}"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _figure(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _speed(p: dict[str, Any]) -> str:
    parts = []
    if p.get("tokens_per_second") is not None:
        parts.append(f"{p['tokens_per_second']:,.0f} tokens/s")
    if p.get("mfu") is not None:
        parts.append(f"MFU {p['mfu']:.1%}")
    if p.get("peak_memory_bytes"):
        parts.append(f"peak memory {p['peak_memory_bytes'] / 2**30:.2f} GiB")
    return ", ".join(parts)


def _startup(phases: dict[str, Any]) -> str:
    """'queue 0.1 s, launch 1.9 s, ..., first_step 2.2 s; 30.4 s to the first step'."""
    parts = [f"{k.replace('_', ' ')} {v:.1f} s" for k, v in phases.items() if k != "total" and isinstance(v, (int, float))]
    total = phases.get("total")
    return ", ".join(parts) + (f"; {total:.1f} s to the first step" if isinstance(total, (int, float)) else "")


def _job_rows(job: dict[str, Any]) -> list[tuple[str, str]]:
    p = job.get("progress") or {}
    rows = [
        ("job", job["id"]), ("status", job["status"]), ("model", job["model"]),
        ("method", (job.get("method") or {}).get("type", "-")),
        ("created", _when(job.get("created_at"))), ("finished", _when(job.get("finished_at"))),
        ("progress", _progress(job) + (f", epoch {p['epoch']:.2f}" if isinstance(p.get("epoch"), float) else "")),
    ]
    if job["status"] == "running" and p.get("eta_seconds") is not None:
        rows.append(("eta", _duration(p["eta_seconds"])))
    if speed := _speed(p):
        rows.append(("speed", speed))
    if isinstance(p.get("startup"), dict):
        rows.append(("start-up", _startup(p["startup"])))
    metrics = job.get("metrics") or {}
    for key in LOSS_KEYS:
        if metrics.get(key) is not None:
            rows.append((key, _figure(metrics[key])))
    if metrics.get("forgetting_loss_before") is not None and metrics.get("forgetting_loss_after") is not None:
        # The general held-out loss before -> after: how much the job cost the base model.
        rows.append(("forgetting", f"loss {metrics['forgetting_loss_before']:.4f} -> {metrics['forgetting_loss_after']:.4f}, "
                     f"perplexity {metrics.get('forgetting_perplexity_before', 0):.2f} -> "
                     f"{metrics.get('forgetting_perplexity_after', 0):.2f}"))
    if job.get("trained_tokens"):
        rows.append(("trained tokens", str(job["trained_tokens"])))
    if job.get("fine_tuned_model"):
        rows.append(("fine-tuned model", job["fine_tuned_model"]))
    if job.get("error"):
        rows.append(("error", f"[red]{job['error'].get('message')}[/red]"))
    return rows


def _print_rows(rows: list[tuple[str, str]]) -> None:
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    out.print(table)


def _print_job(job: dict[str, Any]) -> None:
    _print_rows(_job_rows(job))


def _event_line(e: dict[str, Any]) -> str:
    return f"{_when(e['created_at'])}  {e['level']:<7} {e['type']:<10} {e['message']}"


@app.command()
@friendly
def status(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="A job id (ftjob-...).")],
    events: Annotated[int, typer.Option(help="How many recent events to show.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print the job object as JSON.")] = False,
) -> None:
    """Show a job's status, progress, metrics and latest events."""
    with make_client() as c:
        job = c.get_job(job_id)
        recent = c.events(job_id, limit=events) if events > 0 and not as_json else []
    if as_json:
        print_json(job)
        return
    _print_job(job)
    if recent:
        out.print()
        for e in reversed(recent):
            out.print(_event_line(e), markup=False, highlight=False)


# ------------------------------------------------------------------------------------------ watch and events


def follow_events(c: Client, job_id: str, *, after: str | None = None, limit: int = 20, stream: bool = True,
                  poll_s: float = 2.0) -> Any:
    """Yield the job's events oldest first until it ends: from the SSE stream, else by polling.

    A broken stream is reopened after the last event seen (nothing lost, nothing twice); after
    three failures in a row, or on a server without streams, the list is polled instead.
    """
    import time

    last, failures = after, 0
    while stream and failures < 3:
        try:
            for ev in c.stream_events(job_id, after=last, limit=limit):
                last, failures = ev["id"], 0
                yield ev
            return
        except APIError as exc:
            if exc.status not in (400, 404, 405, 406) or exc.param in ("after", "Last-Event-ID"):
                raise
            break  # an older server: no stream here
        except TuneqError:
            failures += 1
            time.sleep(min(2.0 * failures, 5.0))
    while True:
        status_now = c.get_job(job_id)["status"]  # before the events: a final status implies its last events
        for ev in c.events_since(job_id, last, limit):
            last = ev["id"]
            yield ev
        if status_now in TERMINAL:
            return
        time.sleep(poll_s)


class LiveBar:
    """The rich progress bar of `tuneq watch`: step/total, epoch, loss, tokens/s, ETA."""

    def __init__(self, job: dict[str, Any]):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.progress = Progress(
            TextColumn("[bold]{task.fields[status]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("epoch {task.fields[epoch]}"), TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]}"), TextColumn("ETA {task.fields[eta]}"), console=out,
        )
        self.task = self.progress.add_task(job["id"], total=None, status="", epoch="-", loss="-", speed="-", eta="-")
        self.job(job)

    def __enter__(self) -> LiveBar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def job(self, job: dict[str, Any]) -> None:
        p = job.get("progress") or {}
        status_text = _progress(job) if job["status"] == "queued" else job["status"]
        eta = _duration(p.get("eta_seconds")) if job["status"] == "running" else "-"
        self.progress.update(self.task, status=status_text, eta=eta)
        self.metrics(p)

    def metrics(self, data: dict[str, Any]) -> None:
        fields: dict[str, Any] = {}
        if isinstance(data.get("step"), int):
            fields["completed"] = data["step"]
        if isinstance(data.get("total_steps"), int):
            fields["total"] = data["total_steps"]
        if isinstance(data.get("epoch"), int | float):
            fields["epoch"] = f"{data['epoch']:.2f}"
        if isinstance(data.get("train_loss"), int | float):
            fields["loss"] = f"{data['train_loss']:.4f}"
        if isinstance(data.get("tokens_per_second"), int | float):
            fields["speed"] = f"{data['tokens_per_second']:,.0f} tok/s"
        self.progress.update(self.task, **fields)

    def say(self, line: str) -> None:
        self.progress.console.print(line, markup=False, highlight=False)


def _shown(ev: dict[str, Any]) -> bool:
    """Events worth a line above the bar: everything but the per-step metrics."""
    return ev.get("type") != "metrics"


def _finish_watch(job: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(job), flush=True)
    else:
        out.print()
        _print_job(job)
        if job["status"] == "succeeded":
            out.print(f"download it with `tuneq download {job['id']} DIR`", highlight=False)
    code = EXIT_CODES.get(job["status"], 1)
    if code:
        raise typer.Exit(code)


@app.command()
@friendly
def watch(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="A job id (ftjob-...).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print each event, then the final job, as JSON lines.")] = False,
    stream: Annotated[bool, typer.Option("--stream/--poll", help="Follow the server's event stream, or poll.")] = True,
    interval: Annotated[float, typer.Option(help="Seconds between polls (--poll, or when the stream is unavailable).")] = 2.0,
) -> None:
    """Follow a job live until it ends; exit 0 if it succeeded, 1 if it failed, 3 if cancelled."""
    import time

    with make_client() as c:
        job = c.get_job(job_id)
        if job["status"] in TERMINAL:
            _finish_watch(job, as_json)
            return
        if as_json:
            for ev in follow_events(c, job_id, stream=stream, poll_s=interval):
                print(json.dumps(ev), flush=True)
            _finish_watch(c.get_job(job_id), as_json)
            return
        with LiveBar(job) as bar:
            refreshed = time.monotonic()
            for ev in follow_events(c, job_id, stream=stream, poll_s=interval):
                if _shown(ev):
                    bar.say(_event_line(ev))
                if ev.get("type") == "metrics":
                    bar.metrics(ev.get("data") or {})
                # The job object has what events lack (ETA, queue position); a few reads a second at most.
                if ev.get("type") == "status" or time.monotonic() - refreshed > 2:
                    bar.job(c.get_job(job_id))
                    refreshed = time.monotonic()
            job = c.get_job(job_id)
            bar.job(job)
    _finish_watch(job, as_json)


@app.command()
@friendly
def events(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="A job id (ftjob-...).")],
    limit: Annotated[int, typer.Option(help="How many recent events.")] = 20,
    follow: Annotated[bool, typer.Option("--follow", "-F", help="Keep printing new events until the job ends.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON: a list, or with --follow one event per line.")] = False,
) -> None:
    """Print a job's events, oldest first."""
    with make_client() as c:
        if follow:
            for ev in follow_events(c, job_id, limit=limit):
                print(json.dumps(ev) if as_json else _event_line(ev), flush=True)
            return
        recent = list(reversed(c.events(job_id, limit=limit)))
    if as_json:
        print_json(recent)
        return
    for ev in recent:
        out.print(_event_line(ev), markup=False, highlight=False)


# ------------------------------------------------------------------------------------------ download

# What `tuneq download` fetches: the adapter (or model), the merged model, or the TensorBoard logs.
MERGED_ARCHIVE = "merged.tar.gz"
TENSORBOARD_ARCHIVE = "tensorboard.tar.gz"


def _pick_archive(arts: list[dict[str, Any]], name: str | None = None) -> dict[str, Any] | None:
    if name is not None:
        return next((a for a in arts if a["name"] == name), None)
    archives = [a for a in arts if a.get("kind") == "archive" and a["name"] != MERGED_ARCHIVE]
    for wanted in ARCHIVES:
        for a in archives:
            if a["name"] == wanted:
                return a
    return archives[0] if archives else None


def _unpack(archive: Path, dest: Path) -> None:
    """Unpack into dest; a single top-level folder (adapter/) is flattened so dest is loadable."""
    staging = Path(tempfile.mkdtemp(prefix=".tuneq-unpack-", dir=dest.parent))
    try:
        with tarfile.open(archive, "r:*") as tar:
            # The "data" filter refuses absolute paths, '..', links out of the tree and devices.
            tar.extractall(staging, filter="data")
        entries = list(staging.iterdir())
        root = entries[0] if len(entries) == 1 and entries[0].is_dir() else staging
        dest.mkdir(parents=True, exist_ok=True)
        for entry in root.iterdir():
            shutil.move(str(entry), dest / entry.name)
    except tarfile.TarError as exc:
        raise TuneqError(f"{archive.name}: not a valid archive ({exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _missing_archive(job: dict[str, Any], wanted: str | None) -> str:
    if job["status"] != "succeeded" and wanted != TENSORBOARD_ARCHIVE:
        return f"job {job['id']} has no archive to download (status: {job['status']}; results appear when it succeeds)"
    if wanted == MERGED_ARCHIVE:
        return f"job {job['id']} exported no merged model; create the job with \"export\": {{\"merged\": true}}"
    if wanted == TENSORBOARD_ARCHIVE:
        return f"job {job['id']} has no TensorBoard logs (yet: they are published when the job ends; status: {job['status']})"
    return f"job {job['id']} has no archive to download"


@app.command()
@friendly
def download(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="A succeeded job's id.")],
    dest: Annotated[Path, typer.Argument(metavar="DIR", help="Where the adapter (or model) files go.")],
    merged: Annotated[bool, typer.Option("--merged", help="The adapter merged into the base model (jobs with export.merged).")] = False,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="The TensorBoard logs: `tensorboard --logdir DIR`.")] = False,
    keep_archive: Annotated[bool, typer.Option(help="Also keep the .tar.gz next to DIR.")] = False,
) -> None:
    """Download a job's adapter (or full model, merged model, TensorBoard logs) and unpack it into DIR."""
    if merged and tensorboard:
        raise fail("--merged and --tensorboard: choose one")
    wanted = MERGED_ARCHIVE if merged else TENSORBOARD_ARCHIVE if tensorboard else None
    dest = dest.resolve()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise fail(f"{dest} exists and is not an empty directory")
    with make_client() as c:
        job = c.get_job(job_id)
        art = _pick_archive(c.artifacts(job_id), wanted)
        if art is None:
            raise fail(_missing_archive(job, wanted))
        dest.parent.mkdir(parents=True, exist_ok=True)
        archive = dest.parent / f".{dest.name}.{art['name']}.part"
        try:
            with err.status(f"downloading {art['name']} ({art['bytes']} bytes)"):
                c.download_artifact(job_id, art, archive)
            _unpack(archive, dest)
            if keep_archive:
                archive.replace(dest.parent / f"{dest.name}.{art['name']}")
        finally:
            archive.unlink(missing_ok=True)
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    err.print(f"unpacked {art['name']} into {dest}: {len(files)} files")
    print(dest)


# ------------------------------------------------------------------------------------------ small ones


def _list_table(headers: tuple[str, ...]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for i, h in enumerate(headers):
        # Whole ids and statuses: they are copied into the next command.
        table.add_column(h, no_wrap=i == 0 or h == "status")
    return table


def _control(action: str, job_id: str, as_json: bool) -> None:
    with make_client() as c:
        job = getattr(c, f"{action}_job")(job_id)
    if as_json:
        print_json(job)
    else:
        print(f"{job['id']} {job['status']}")


JobArg = Annotated[str, typer.Argument(metavar="JOB", help="A job id (ftjob-...).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the job object as JSON.")]


@app.command()
@friendly
def cancel(job_id: JobArg, as_json: JsonOpt = False) -> None:
    """Cancel a job (a running one stops at its next poll)."""
    _control("cancel", job_id, as_json)


@app.command()
@friendly
def pause(job_id: JobArg, as_json: JsonOpt = False) -> None:
    """Pause a job: a running one saves a checkpoint and frees its GPUs; `tuneq resume` continues it."""
    _control("pause", job_id, as_json)


@app.command()
@friendly
def resume(job_id: JobArg, as_json: JsonOpt = False) -> None:
    """Put a paused job back in the queue; it continues from its latest checkpoint."""
    _control("resume", job_id, as_json)


@app.command("list")
@friendly
def list_jobs(
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
    status_filter: Annotated[str | None, typer.Option("--status", help="Only jobs in this status.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the job objects as JSON.")] = False,
) -> None:
    """List recent jobs (alias: jobs)."""
    with make_client() as c:
        items = c.list_jobs(limit, status_filter)
    if as_json:
        print_json(items)
        return
    table = _list_table(("job", "status", "model", "method", "progress", "created"))
    for j in items:
        table.add_row(j["id"], j["status"], j["model"], (j.get("method") or {}).get("type", "-"), _progress(j),
                      _when(j["created_at"], "%m-%d %H:%M"))
    out.print(table)


app.command("jobs", hidden=True)(list_jobs)


@app.command()
@friendly
def models(as_json: Annotated[bool, typer.Option("--json", help="Print the model objects as JSON.")] = False) -> None:
    """List the base models the server offers."""
    with make_client() as c:
        items = c.models()
    if as_json:
        print_json(items)
        return
    for m in items:
        print(m["id"])


# ------------------------------------------------------------------------------------------ files

files_app = typer.Typer(cls=_OneLineErrors, no_args_is_help=True, help="Training data: upload, list, show the validation report.")
app.add_typer(files_app, name="files")


def _report_rows(f: dict[str, Any]) -> list[tuple[str, str]]:
    v = f.get("validation") or {}
    rows = [("file", f["id"]), ("name", f["filename"]), ("status", f["status"]), ("bytes", str(f["bytes"])),
            ("created", _when(f.get("created_at"))), ("format", str(v.get("format") or "-")),
            ("lines", str(v.get("lines", "-"))), ("examples", str(v.get("examples", "-")))]
    for key in ("tokens", "trained_tokens", "longest", "truncated", "dropped"):
        if v.get(key) is not None:
            rows.append((key, str(v[key])))
    if v.get("error_counts"):
        rows.append(("problems", ", ".join(f"{code} x{n}" for code, n in sorted(v["error_counts"].items()))))
    return rows


@files_app.command("upload")
@friendly
def files_upload(
    path: Annotated[Path, typer.Argument(help="A JSONL file, one example per line.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the file object (with its validation report) as JSON.")] = False,
) -> None:
    """Upload a file; every line is checked now. Prints its id; a refused file lists its bad lines and exits 1."""
    if not path.is_file():
        raise fail(f"{path}: no such file")
    with make_client() as c:
        f = c.upload_file(path)
    if as_json:
        print_json(f)
    elif f.get("status") == "processed":
        err.print(f"uploaded {path} as {f['id']} ({(f.get('validation') or {}).get('examples', '?')} examples)")
        print(f["id"])
    else:
        _show_bad_lines(path, f)
    if f.get("status") != "processed":
        raise fail(f"{path} was refused: {f.get('status_details') or 'validation failed'}")


@files_app.command("list")
@friendly
def files_list(
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print the file objects as JSON.")] = False,
) -> None:
    """List your uploaded files."""
    with make_client() as c:
        items = c.list_files(limit)
    if as_json:
        print_json(items)
        return
    table = _list_table(("file", "name", "status", "examples", "bytes", "created"))
    for f in items:
        table.add_row(f["id"], f["filename"], f["status"], str((f.get("validation") or {}).get("examples", "-")),
                      str(f["bytes"]), _when(f["created_at"], "%m-%d %H:%M"))
    out.print(table)


@files_app.command("show")
@friendly
def files_show(
    file_id: Annotated[str, typer.Argument(metavar="FILE", help="A file id (file-...).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the file object as JSON.")] = False,
) -> None:
    """Show a file and its validation report (format, examples, tokens, bad lines)."""
    with make_client() as c:
        f = c.get_file(file_id)
    if as_json:
        print_json(f)
        return
    _print_rows(_report_rows(f))
    if f.get("status") != "processed":
        _show_bad_lines(Path(f["filename"]), f)


# ------------------------------------------------------------------------------------------ config


@app.command("config")
@friendly
def config_cmd(
    url: Annotated[str | None, typer.Option(help="Save the server's URL.")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", help="Save the API key.")] = None,
) -> None:
    """Show where the server and key come from; with --url/--api-key, save them to the config file."""
    if url is not None or api_key is not None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise fail(f"--url: must start with http:// or https://, got {url!r}")
        path = config.save(url=url, api_key=api_key)
        err.print(f"saved to {path}")
    found_url, url_from = config.setting("url")
    from tuneq.client import DEFAULT_URL, find_api_key

    key = find_api_key()
    key_from = config.setting("api_key")[1] or ("a key file" if key else "")
    print(f"url      {found_url or DEFAULT_URL}  ({url_from or 'default'})")
    print(f"api_key  {key[:12] + '...' if key else '(none)'}  ({key_from or 'not set'})")
    print(f"config   {config.config_path()}")


# ------------------------------------------------------------------------------------------ up


@app.command()
@friendly
def up(
    home: Annotated[Path | None, typer.Option(help="State directory (default: $TUNEQ_HOME or ./var).")] = None,
    host: Annotated[str, typer.Option(help="Address the API listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the API.")] = 8000,
    worker: Annotated[bool, typer.Option(help="Start a worker too.")] = True,
) -> None:
    """Run the embedded stack here: migrations, tiny model, Redis, the API and a worker."""
    from tuneq.stack import Stack

    stack = Stack(home=(home or Path(os.environ.get("TUNEQ_HOME") or "var")), host=host, port=port, worker=worker,
                  log=lambda msg: err.print(msg, highlight=False))
    code = stack.run()
    if code:
        raise typer.Exit(code)



# ------------------------------------------------------------------------------------------ admin

admin_app = typer.Typer(
    cls=_OneLineErrors, no_args_is_help=True,
    help="Users and API keys, written straight to the database ($TUNEQ_DATABASE_URL, default $TUNEQ_HOME/tuneq.db): "
    "they are how access starts, so they cannot need a key themselves.",
)
app.add_typer(admin_app, name="admin")


def _admin_session():  # noqa: ANN202 - a context manager of core.db
    from core.db import session_scope

    return session_scope()


def _database_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from sqlalchemy.exc import OperationalError, ProgrammingError

        from core.identity import IdentityError

        try:
            return fn(*args, **kwargs)
        except IdentityError as exc:
            raise fail(str(exc)) from None
        except (OperationalError, ProgrammingError) as exc:
            reason = str(exc.orig).splitlines()[0] if exc.orig is not None else type(exc).__name__
            raise fail(f"database: {reason}; is TUNEQ_DATABASE_URL right and migrated (`python -m core.migrate`)?") from None

    return wrapper  # type: ignore[return-value]


@admin_app.command("create-user")
@friendly
@_database_errors
def create_user_cmd(
    name: Annotated[str, typer.Argument(help="A unique user name.")],
    role: Annotated[str, typer.Option(help="admin | member.")] = "member",
    team: Annotated[str | None, typer.Option(help="Team name; created on first use. Teammates can read each other's jobs.")] = None,
) -> None:
    """Create a user; print its id."""
    from core.identity import create_user

    with _admin_session() as db:
        user = create_user(db, name, role, team)
        user_id = user.id
    err.print(f"created {role} {name}" + (f" in team {team}" if team else "") + f"; give them a key with `tuneq admin create-key {name}`")
    print(user_id)


@admin_app.command("create-key")
@friendly
@_database_errors
def create_key_cmd(
    user: Annotated[str, typer.Argument(metavar="USER", help="User name or id.")],
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
) -> None:
    """Create an API key for USER and print it. It is shown only this once."""
    from core.identity import IdentityError, create_key, find_user

    with _admin_session() as db:
        found = find_user(db, user)
        if found is None:
            raise IdentityError(f"no user {user!r}; create it with `tuneq admin create-user`")
        key, token = create_key(db, found, name)
        key_id = key.id
    err.print(f"created {key_id} for {user}; the key is shown only now, store it (e.g. TUNEQ_API_KEY)")
    print(token)


@admin_app.command("revoke-key")
@friendly
@_database_errors
def revoke_key_cmd(key_id: Annotated[str, typer.Argument(metavar="KEY_ID", help="A key id (key-...).")]) -> None:
    """Revoke an API key; requests with it fail from now on."""
    from core.identity import revoke_key

    with _admin_session() as db:
        revoke_key(db, key_id)
    print(f"{key_id} revoked")
