"""How the commands show things: job and file rows, event lines, tables, the plan, the live bar."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from rich.table import Table

from trainer.vocabulary import PREFERENCE_TRAIN_METRICS, PREFERENCE_VALID_METRICS, eval_scores
from tuneq.cli.common import err, out

BAD_LINES_SHOWN = 20
LOSS_KEYS = ("train_loss", "valid_loss", "valid_mean_token_accuracy", "full_valid_loss", "full_valid_mean_token_accuracy",
             *PREFERENCE_TRAIN_METRICS, *PREFERENCE_VALID_METRICS)
PLAN_PARTS = ("weights", "gradients", "optimizer_states", "activations", "logits", "overhead", "total")


def when(t: int | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return datetime.fromtimestamp(t).strftime(fmt) if t else "-"


def show_bad_lines(path: Path, f: dict[str, Any]) -> None:
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


def progress_text(job: dict[str, Any]) -> str:
    p = job.get("progress") or {}
    step, total = p.get("step"), p.get("total_steps")
    if job.get("status") == "queued" and p.get("queue_position"):
        return f"queued #{p['queue_position']}"
    if step is None:
        return "-"
    return f"step {step}/{total}" if total else f"step {step}"


def duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _figure(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _speed(p: dict[str, Any]) -> str:
    parts = []
    if isinstance(p.get("step_seconds"), int | float):
        parts.append(f"{p['step_seconds']:.2f} s/step")
    if isinstance(p.get("eval_seconds"), int | float):
        # The eval block's generation, once per checkpoint: its cost beside the step time.
        parts.append(f"eval {p['eval_seconds']:.1f} s per pass (step {p.get('eval_step')})")
    if p.get("tokens_per_second") is not None:
        parts.append(f"{p['tokens_per_second']:,.0f} tokens/s")
    if p.get("mfu") is not None:
        parts.append(f"MFU {p['mfu']:.1%}")
    if p.get("peak_memory_bytes"):
        parts.append(f"peak memory {p['peak_memory_bytes'] / 2**30:.2f} GiB")
    return ", ".join(parts)


def _startup(phases: dict[str, Any]) -> str:
    """'queue 0.1 s, launch 1.9 s, ..., first step 2.2 s; 30.4 s to the first step'."""
    parts = [f"{k.replace('_', ' ')} {v:.1f} s" for k, v in phases.items() if k != "total" and isinstance(v, (int, float))]
    total = phases.get("total")
    return ", ".join(parts) + (f"; {total:.1f} s to the first step" if isinstance(total, (int, float)) else "")


def method_label(job: dict[str, Any]) -> str:
    """A job's method as a word: `lora`, or with a preference objective `dpo (lora)`."""
    m = job.get("method") or {}
    body = m.get(m.get("type")) or {}
    name = body.get("method") if isinstance(body.get("method"), str) else m.get("type", "-")
    return name if m.get("type") in ("supervised", None) else f"{m['type']} ({name})"


def _job_rows(job: dict[str, Any]) -> list[tuple[str, str]]:
    p = job.get("progress") or {}
    rows = [
        ("job", job["id"]), ("status", job["status"]), ("model", job["model"]),
        ("method", method_label(job)),
        ("created", when(job.get("created_at"))), ("finished", when(job.get("finished_at"))),
        ("progress", progress_text(job) + (f", epoch {p['epoch']:.2f}" if isinstance(p.get("epoch"), float) else "")),
    ]
    if job.get("host"):
        gpu = job.get("gpu") or {}
        on = f" ({gpu.get('count', 1)} x {gpu['name']}, {gpu['memory_gib']:g} GiB)" if gpu.get("name") else ""
        rows.append(("host", job["host"] + on))
    if job["status"] == "running" and p.get("eta_seconds") is not None:
        rows.append(("eta", duration(p["eta_seconds"])))
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
    scores = {k.removeprefix("eval_"): v for k, v in eval_scores(metrics).items()}
    if scores:
        rows.append(("eval", ", ".join(f"{k} {v:.3f}" for k, v in scores.items())))
    if metrics.get("export_metric") and metrics.get("exported_step") is not None:
        rows.append(("exported", f"step {metrics['exported_step']} (best {metrics['export_metric']} "
                     f"{_figure(metrics.get('export_score'))})"))
    if job.get("trained_tokens"):
        rows.append(("trained tokens", str(job["trained_tokens"])))
    if job.get("fine_tuned_model"):
        rows.append(("fine-tuned model", job["fine_tuned_model"]))
    if job.get("error"):
        rows.append(("error", f"[red]{job['error'].get('message')}[/red]"))
    return rows


def print_rows(rows: list[tuple[str, str]]) -> None:
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    out.print(table)


def print_job(job: dict[str, Any]) -> None:
    print_rows(_job_rows(job))


def event_line(e: dict[str, Any]) -> str:
    return f"{when(e['created_at'])}  {e['level']:<7} {e.get('kind', e['type']):<10} {e['message']}"


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
        status_text = progress_text(job) if job["status"] == "queued" else job["status"]
        eta = duration(p.get("eta_seconds")) if job["status"] == "running" else "-"
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


def list_table(headers: tuple[str, ...]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for i, h in enumerate(headers):
        # Whole ids and statuses: they are copied into the next command.
        table.add_column(h, no_wrap=i == 0 or h == "status")
    return table


def report_rows(f: dict[str, Any]) -> list[tuple[str, str]]:
    v = f.get("validation") or {}
    rows = [("file", f["id"]), ("name", f["filename"]), ("status", f["status"]), ("bytes", str(f["bytes"])),
            ("created", when(f.get("created_at"))), ("format", str(v.get("format") or "-")),
            ("lines", str(v.get("lines", "-"))), ("examples", str(v.get("examples", "-")))]
    for key in ("tokens", "trained_tokens", "longest", "truncated", "dropped"):
        if v.get(key) is not None:
            rows.append((key, str(v[key])))
    if v.get("error_counts"):
        rows.append(("problems", ", ".join(f"{code} x{n}" for code, n in sorted(v["error_counts"].items()))))
    return rows

def print_plan(got: dict[str, Any], model: str) -> None:
    """The plan route's answer: memory per method and its parts, notes, the recommendation, the time."""
    p = got["plan"]
    hosts = f" on {p['nodes']} hosts" if p.get("nodes", 1) > 1 else ""
    table = Table(title=f"{model}: {p['model']['params'] / 1e9:.3g}B params, {p['gpus']} x {p['available_gib']:g} GiB{hosts} "
                        f"(usable {p['usable_bytes'] / 2**30:.1f} GiB), max_seq_len {p['seq_len']}")
    table.add_column("method")
    table.add_column("batch", justify="right")
    for part in PLAN_PARTS:
        table.add_column(part.replace("_states", "").replace("_", " "), justify="right")
    table.add_column("fits")
    for name, mp in p["methods"].items():
        gib = mp["estimate"]["breakdown_gib"]
        table.add_row(name, str(mp["batch_size"] or "-"), *(f"{gib[k]:.2f}" for k in PLAN_PARTS),
                      "yes" if mp["fits"] else "no")
    out.print(table)
    for note in p.get("notes", []):
        out.print(f"note: {note}")
    rec = got["recommendation"]
    out.print(("recommended: " if rec["fits"] else "refused: ") + rec["message"])
    t = got["time"]
    if t["seconds"] is not None:
        counted = f"{t['dataset_tokens']} tokens" if t["dataset_tokens"] is not None else "file's tokens not counted yet"
        out.print(f"time: {counted}, {t['flops']:.3g} FLOPs, {t['seconds'] / 3600:.2f} h, "
                  f"{t['gpu_hours']:.3g} GPU-hours")
        if t.get("wall_seconds") is not None:
            wall = t["wall_seconds"]
            out.print(f"wall to the last step: {f'{wall:.0f} s' if wall < 3600 else f'{wall / 3600:.2f} h'} "
                      f"(start-up {t['startup_seconds']:.0f} s, "
                      f"{t['checkpoints']} checkpoint(s) before the last step {t['checkpoint_seconds']:.0f} s)")
