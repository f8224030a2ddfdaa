"""`python -m trainer run|tiny|validate|standby`: the process the worker launches (docs/internals.md).

Bad input gets one line on stderr and exit code 2, never a traceback: the worker shows that line
to the user as the job's error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

EXIT_USAGE = 2


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m trainer", description="tuneq trainer")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="train a job spec into a work directory")
    run.add_argument("spec", type=Path)
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    tiny = sub.add_parser("tiny", help="build a tiny Llama-shaped model with tokenizer and chat template")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    standby = sub.add_parser("standby", help="import the trainer, then run the job that arrives on stdin (trainer.standby)")
    standby.add_argument("--template", action="store_true",
                         help="fork a trainer for each job that arrives instead (trainer.template)")
    val = sub.add_parser("validate", help="print the validation report of a JSONL file")
    val.add_argument("file", type=Path)
    val.add_argument("--model", help="model directory whose tokenizer counts tokens")
    val.add_argument("--max-seq-len", type=int, default=None)
    val.add_argument("--format", default="auto", choices=["auto", "chat", "alpaca", "prompt_completion", "text", "eval"])
    warm = sub.add_parser("warm-kernels", help="compile the fast path's kernels for these models (trainer.kernel_warmup)")
    warm.add_argument("models", nargs="+")
    return p


def format_validation_error(exc: Exception) -> str:
    """One line naming each bad field: 'hyperparameters.batch_size: Input should be ...'."""
    parts = []
    for err in exc.errors():  # type: ignore[attr-defined]
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc and not msg.startswith(loc) else msg)
    return "; ".join(parts)


def load_spec(path: Path):
    from pydantic import ValidationError

    from trainer.spec import JobSpec

    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read spec {path}: {exc.strerror}") from exc
    try:
        return JobSpec.model_validate_json(raw)
    except ValidationError as exc:
        raise UsageError(f"invalid spec {path}: {format_validation_error(exc)}") from exc


def _run(args: argparse.Namespace, own_process: bool = False) -> int:
    from trainer.watchdog import watch_supervisor

    # Before anything slow (loading a model): an orphan must not take a GPU no one tracks.
    watch_supervisor()
    try:
        spec = load_spec(args.spec)
        files = [("training_file", spec.training_file), ("validation_file", spec.validation_file),
                 ("forgetting_file", spec.forgetting_file)]
        files += [(f"mix[{k}].file", m.file) for k, m in enumerate(spec.mix)]
        for name, value in files:
            if value is not None and not Path(value).is_file():
                raise UsageError(f"{name}: {value} is not a readable file")
    except UsageError as exc:
        # The worker reads events, not stderr: the job's error must be there too. Rank 0 only;
        # torchrun and accelerate set RANK before the process starts.
        if os.environ.get("RANK", "0") == "0":
            from trainer.events import EventWriter

            with EventWriter(args.out / "events.jsonl") as events:
                events.emit("error", str(exc), level="error", code="config", hint="fix the job spec")
        raise
    from trainer.startup import skip_unused_libraries, warm_device

    if own_process:
        skip_unused_libraries(spec)
    # torch first, here, so that the warm-up thread never imports it alongside the main thread.
    import torch  # noqa: F401

    warm_device()
    from trainer.job import run_job

    return run_job(spec, args.out, resume=args.resume)


def _tiny(args: argparse.Namespace) -> int:
    from trainer.tiny import build_tiny

    if args.seed < 0:
        raise UsageError("--seed: must be 0 or more")
    from trainer.model import quiet_libraries

    quiet_libraries()
    print(build_tiny(args.dir, seed=args.seed))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from trainer.data.validate import validate_file

    if not args.file.is_file():
        raise UsageError(f"{args.file} is not a readable file")
    if args.max_seq_len is not None and args.max_seq_len < 1:
        raise UsageError("--max-seq-len: must be 1 or more")
    tokenizer = None
    if args.model:
        from trainer.errors import ModelError
        from trainer.model import load_tokenizer, quiet_libraries

        quiet_libraries()
        try:
            tokenizer = load_tokenizer(args.model)
        except ModelError as err:
            raise UsageError(err.message) from err
    report = validate_file(args.file, tokenizer, args.max_seq_len, data_format=args.format)
    print(json.dumps(report, indent=1))
    return 0 if report["valid"] else 1


def _warm_kernels(args: argparse.Namespace) -> int:
    from trainer.kernel_warmup import warm
    from trainer.model import quiet_libraries

    quiet_libraries()
    report = warm(args.models)
    print(json.dumps(report))
    return 0 if all("error" not in r for r in report["models"].values()) else 1


def _standby(args: argparse.Namespace) -> int:
    if args.template:
        from trainer.template import main as template_main

        return template_main()
    from trainer.standby import main as standby_main

    return standby_main()


def main(argv: list[str] | None = None, own_process: bool = False) -> int:
    """`own_process`: this process is the trainer's alone (`python -m trainer`), so `run` may hide
    the libraries the job does not use (trainer.startup.skip_unused_libraries) from the whole
    process; a caller that runs a job in its own process (a test, or a standby trainer, which
    imported them before its job arrived) keeps every module it has."""
    try:
        args = _parser().parse_args(argv)
        if args.command == "run":
            return _run(args, own_process)
        return {"tiny": _tiny, "validate": _validate, "standby": _standby,
                "warm-kernels": _warm_kernels}[args.command](args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
