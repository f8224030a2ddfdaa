"""`tuneq plan`: what each method needs on the server's GPUs, what fits, how long it takes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from trainer.vocabulary import METHODS, OBJECTIVES, PREFERENCE_OBJECTIVES
from tuneq.cli.common import client, fail, friendly
from tuneq.cli.render import print_plan
from tuneq.cli.submit import forget_uploads, upload


@friendly
def plan(
    file: Annotated[Path, typer.Argument(help="Training data: JSONL, one example (or preference pair) per line.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Base model (see `tuneq models`).")],
    method: Annotated[str, typer.Option(help="auto | " + " | ".join(METHODS) + ".")] = "auto",
    batch_size: Annotated[str | None, typer.Option("--batch-size", help="Examples per micro-batch, or auto.")] = None,
    max_seq_len: Annotated[int | None, typer.Option("--max-seq-len", help="Tokens per example.")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Passes over the data.")] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing")] = None,
    gpus: Annotated[int, typer.Option(help="GPUs the job would get on each host.")] = 1,
    nodes: Annotated[int, typer.Option(help="Hosts the job would span, --gpus on each.")] = 1,
    objective: Annotated[str, typer.Option(help=" | ".join(OBJECTIVES) + " (dpo, simpo, orpo: a preference file; "
                         "two rows a pair, and dpo of full weights a frozen reference).")] = "sft",
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole plan as JSON.")] = False,
) -> None:
    """Upload FILE and show how much GPU memory each method needs, what fits, and how long it takes."""
    if method not in (*METHODS, "auto"):
        raise fail(f"--method: must be auto or one of {', '.join(METHODS)}, got {method!r}")
    if objective not in OBJECTIVES:
        raise fail(f"--objective: must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    hp: dict[str, Any] = {k: v for k, v in {"n_epochs": epochs, "max_seq_len": max_seq_len}.items() if v is not None}
    if batch_size is not None:
        if batch_size != "auto" and not batch_size.isdigit():
            raise fail(f"--batch-size: a positive integer or auto, got {batch_size!r}")
        hp["batch_size"] = batch_size if batch_size == "auto" else int(batch_size)
    uploaded: list[str] = []
    with client() as c:
        try:  # the file is uploaded to be counted; the plan keeps nothing, and neither does the command
            body: dict[str, Any] = {"model": model, "training_file": upload(c, file, "training file", uploaded),
                                    "method": method, "hyperparameters": hp, "gpus": gpus, "nodes": nodes}
            if objective in PREFERENCE_OBJECTIVES:
                body["method"] = {"type": objective, objective: {"method": method}}
            if gradient_checkpointing is not None:
                body["gradient_checkpointing"] = gradient_checkpointing
            got = c.plan_job(body)
        finally:
            forget_uploads(c, uploaded)
    if as_json:
        print(json.dumps(got, indent=2))
        return
    print_plan(got, model)
    if not got["recommendation"]["fits"]:
        raise typer.Exit(2)
