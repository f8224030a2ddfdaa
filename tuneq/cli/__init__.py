"""`tuneq`: submit a fine-tuning job, follow it, download its result, or run the whole stack here.

Every failure a user can cause or meet (a bad file, an unreachable server, a refused job) ends in
one line on stderr and a non-zero exit; a traceback would only hide the message.

The commands live in small modules: those that talk to the API (submit, plan, jobs, watch,
download, files, chat), the database admin (admin), this machine (local), and how things are shown
(render). This module only assembles them.
"""

from __future__ import annotations

import typer

from tuneq.cli import admin, chat, download, files, hosts, jobs, local, plan, submit, watch
from tuneq.cli.common import OneLineErrors
from tuneq.client import Client

app = typer.Typer(
    cls=OneLineErrors,
    help="tuneq: self-hosted LLM fine-tuning. Talks to the API at $TUNEQ_URL (or `url` in ~/.config/tuneq/config.toml, "
    "default http://127.0.0.1:8000) with the key $TUNEQ_API_KEY (or `api_key` there).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def make_client() -> Client:
    """The client every remote command uses (tests point it at an app in process)."""
    return Client()


# In the order `tuneq --help` lists them.
for command in (submit.submit, plan.plan, jobs.status, watch.watch, watch.events, download.download, jobs.cancel,
                jobs.pause, jobs.resume):
    app.command()(command)
app.command("list")(jobs.list_jobs)
app.command("jobs", hidden=True)(jobs.list_jobs)
app.command()(jobs.models)
app.command()(chat.chat)
app.command()(hosts.hosts)
app.add_typer(files.app, name="files")
app.command("config")(local.config_cmd)
app.command()(local.up)
app.add_typer(admin.app, name="admin")
