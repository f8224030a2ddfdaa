"""`tuneq hosts`: the worker hosts of the cluster, their GPUs, free GPUs and disks."""

from __future__ import annotations

from typing import Annotated

import typer

from tuneq.cli.common import client, friendly, print_json


@friendly
def hosts(as_json: Annotated[bool, typer.Option("--json", help="Print the host objects as JSON.")] = False) -> None:
    """List the worker hosts with their GPUs, free GPUs and disk."""
    with client() as c:
        items = c.hosts()
    if as_json:
        print_json(items)
        return
    for h in items:
        kinds = ", ".join(sorted({f"{g['name']} {g['memory_gib']} GiB" for g in h["gpu_info"]})) or h["kind"]
        disk = "disk full" if h["disk_full"] else f"{h['disk_free_gib']} GiB free"
        print(f"{h['host']}  {h['free']}/{h['gpus']} free  {kinds}  {disk}  workers: {len(h['workers'])}")
