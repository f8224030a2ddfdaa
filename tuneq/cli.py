"""`tuneq`: submit a fine-tuning job, follow it, download its result, or run the whole stack here.

Every failure a user can cause or meet (a bad file, an unreachable server, a refused job) ends in
one line on stderr and a non-zero exit; a traceback would only hide the message.
"""

from __future__ import annotations

import functools
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
    help="tuneq: self-hosted LLM fine-tuning. Talks to the API at $TUNEQ_URL (default http://127.0.0.1:8000).",
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
        except TuneqError as exc:
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


def _when(t: int | None) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


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


@app.command()
@friendly
def submit(
    file: Annotated[Path, typer.Argument(help="Training data: chat JSONL, one example per line.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Base model (see `tuneq models`).")],
    method: Annotated[str, typer.Option(help="lora | qlora | full.")] = "lora",
    epochs: Annotated[int | None, typer.Option("--epochs", help="Passes over the data.")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Optimizer steps (overrides --epochs).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Examples per micro-batch.")] = None,
    max_seq_len: Annotated[int | None, typer.Option("--max-seq-len", help="Tokens per example.")] = None,
    lora_r: Annotated[int | None, typer.Option("--lora-r", help="LoRA rank.")] = None,
    lora_alpha: Annotated[float | None, typer.Option("--lora-alpha", help="LoRA alpha.")] = None,
    validation_file: Annotated[Path | None, typer.Option("--validation-file", help="Validation JSONL.")] = None,
    suffix: Annotated[str | None, typer.Option(help="Added to the fine-tuned model's name.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of data order and init.")] = None,
    priority: Annotated[int, typer.Option(help="Higher runs first.")] = 0,
    gpus: Annotated[int, typer.Option(help="GPUs the job needs.")] = 1,
) -> None:
    """Upload FILE, create a fine-tuning job on it and print the job id."""
    if method not in METHODS:
        raise fail(f"--method: must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "full" and (lora_r is not None or lora_alpha is not None):
        raise fail("--lora-r/--lora-alpha apply to --method lora or qlora")
    hp = {k: v for k, v in {"n_epochs": epochs, "max_steps": max_steps, "learning_rate": lr, "batch_size": batch_size,
                            "max_seq_len": max_seq_len}.items() if v is not None}
    lora = {k: v for k, v in {"r": lora_r, "alpha": lora_alpha}.items() if v is not None}
    with make_client() as c:
        body: dict[str, Any] = {
            "model": model, "training_file": _upload(c, file, "training file"),
            "method": {"type": method, method: lora} if lora else method,
            "hyperparameters": hp, "priority": priority, "gpus": gpus,
        }
        if validation_file is not None:
            body["validation_file"] = _upload(c, validation_file, "validation file")
        for key, value in (("suffix", suffix), ("seed", seed)):
            if value is not None:
                body[key] = value
        job = c.create_job(body)
    err.print(f"created {job['id']} ({job['status']}); follow it with `tuneq status {job['id']}`")
    # Only the id on stdout, so that JOB=$(tuneq submit ...) works.
    print(job["id"])


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


def _progress(job: dict[str, Any]) -> str:
    p = job.get("progress") or {}
    step, total = p.get("step"), p.get("total_steps")
    if step is None:
        return "-"
    return f"step {step}/{total}" if total else f"step {step}"


@app.command()
@friendly
def status(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="A job id (ftjob-...).")],
    events: Annotated[int, typer.Option(help="How many recent events to show.")] = 5,
) -> None:
    """Show a job's status, progress, metrics and latest events."""
    with make_client() as c:
        job = c.get_job(job_id)
        recent = c.events(job_id, limit=events) if events > 0 else []
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    method = (job.get("method") or {}).get("type", "-")
    rows = [
        ("job", job["id"]), ("status", job["status"]), ("model", job["model"]), ("method", method),
        ("created", _when(job.get("created_at"))), ("finished", _when(job.get("finished_at"))),
        ("progress", _progress(job)),
    ]
    metrics = job.get("metrics") or {}
    for key in ("train_loss", "valid_loss", "valid_mean_token_accuracy", "full_valid_loss", "full_valid_mean_token_accuracy"):
        if metrics.get(key) is not None:
            rows.append((key, f"{metrics[key]:.4f}" if isinstance(metrics[key], float) else str(metrics[key])))
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
    for k, v in rows:
        table.add_row(k, v)
    out.print(table)
    if recent:
        out.print()
        for e in reversed(recent):
            out.print(f"{_when(e['created_at'])}  {e['level']:<7} {e['message']}", markup=False, highlight=False)


# ------------------------------------------------------------------------------------------ download


def _pick_archive(arts: list[dict[str, Any]]) -> dict[str, Any] | None:
    archives = [a for a in arts if a.get("kind") == "archive"]
    for name in ARCHIVES:
        for a in archives:
            if a["name"] == name:
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


@app.command()
@friendly
def download(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="A succeeded job's id.")],
    dest: Annotated[Path, typer.Argument(metavar="DIR", help="Where the adapter (or model) files go.")],
    keep_archive: Annotated[bool, typer.Option(help="Also keep the .tar.gz next to DIR.")] = False,
) -> None:
    """Download a job's adapter (or full model) archive and unpack it into DIR."""
    dest = dest.resolve()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise fail(f"{dest} exists and is not an empty directory")
    with make_client() as c:
        job = c.get_job(job_id)
        art = _pick_archive(c.artifacts(job_id))
        if art is None:
            hint = "" if job["status"] == "succeeded" else f" (status: {job['status']}; results appear when it succeeds)"
            raise fail(f"job {job_id} has no archive to download{hint}")
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


@app.command()
@friendly
def cancel(job_id: Annotated[str, typer.Argument(metavar="JOB")]) -> None:
    """Cancel a job (a running one stops at its next poll)."""
    with make_client() as c:
        job = c.cancel_job(job_id)
    print(f"{job['id']} {job['status']}")


@app.command()
@friendly
def jobs(limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20) -> None:
    """List recent jobs."""
    with make_client() as c:
        items = c.list_jobs(limit)
    table = Table("job", "status", "model", "method", "progress", "created")
    for j in items:
        table.add_row(j["id"], j["status"], j["model"], (j.get("method") or {}).get("type", "-"), _progress(j), _when(j["created_at"]))
    out.print(table)


@app.command()
@friendly
def models() -> None:
    """List the base models the server offers."""
    with make_client() as c:
        for m in c.models():
            print(m["id"])


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
