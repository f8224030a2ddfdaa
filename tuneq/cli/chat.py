"""`tuneq chat MODEL`: talk to a base model, a fine-tuned model or a checkpoint, token by token."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from tuneq.cli.common import client, err, fail, friendly
from tuneq.client import Client

EXIT_WORDS = ("/exit", "/quit")


def _model_name(c: Client, model: str) -> str:
    """A job id stands for its fine-tuned model, so `tuneq chat ftjob-...` works too."""
    if model.startswith("ftjob-"):
        job = c.get_job(model)
        if not job.get("fine_tuned_model"):
            raise fail(f"job {model} has no fine-tuned model yet (status {job['status']})")
        return str(job["fine_tuned_model"])
    return model


def _answer(c: Client, body: dict[str, Any]) -> str:
    parts = []
    for piece in c.chat(body):
        parts.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(parts)


@friendly
def chat(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="A base model, a fine_tuned_model (ft:...), a checkpoint's "
                                                               "model name, or a job id (its fine-tuned model).")],
    message: Annotated[str | None, typer.Option("-m", "--message", help="Ask this once, print the answer and exit.")] = None,
    system: Annotated[str | None, typer.Option("--system", help="A system message before the conversation.")] = None,
    temperature: Annotated[float, typer.Option(help="0 answers greedily (the same answer every time).")] = 0.7,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Most tokens per answer (default: the server's).")] = None,
) -> None:
    """Chat with a model: one question with -m, else a conversation (empty line or /exit ends it)."""
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    options: dict[str, Any] = {"temperature": temperature, **({"max_tokens": max_tokens} if max_tokens is not None else {})}
    with client() as c:
        name = _model_name(c, model)
        if message is not None:
            _answer(c, {"model": name, "messages": [*history, {"role": "user", "content": message}], **options})
            return
        err.print(f"chatting with {name}; an empty line or /exit ends it", highlight=False)
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if not line.strip() or line.strip() in EXIT_WORDS:
                break
            history.append({"role": "user", "content": line})
            history.append({"role": "assistant", "content": _answer(c, {"model": name, "messages": history, **options})})
