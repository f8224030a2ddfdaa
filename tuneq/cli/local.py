"""Commands about this machine: `tuneq config` (where the server and key come from) and `tuneq up`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from tuneq import config
from tuneq.cli.common import err, fail, friendly


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
