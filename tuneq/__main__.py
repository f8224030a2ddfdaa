"""`python -m tuneq ...`: the CLI without an installed entry point."""

from tuneq.cli import app

app(prog_name="tuneq")
