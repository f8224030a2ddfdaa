"""`tuneq files`: upload training data, list it, show a file's validation report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tuneq.cli.common import OneLineErrors, client, err, fail, friendly, out, print_json
from tuneq.cli.render import list_table, print_rows, report_rows, show_bad_lines, when

app = typer.Typer(cls=OneLineErrors, no_args_is_help=True, help="Training data: upload, list, show the validation report.")


@app.command("upload")
@friendly
def files_upload(
    path: Annotated[Path, typer.Argument(help="A JSONL file, one example per line.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the file object (with its validation report) as JSON.")] = False,
) -> None:
    """Upload a file; every line is checked now. Prints its id; a refused file lists its bad lines and exits 1."""
    if not path.is_file():
        raise fail(f"{path}: no such file")
    with client() as c:
        f = c.upload_file(path)
    if as_json:
        print_json(f)
    elif f.get("status") == "processed":
        err.print(f"uploaded {path} as {f['id']} ({(f.get('validation') or {}).get('examples', '?')} examples)")
        print(f["id"])
    else:
        show_bad_lines(path, f)
    if f.get("status") != "processed":
        raise fail(f"{path} was refused: {f.get('status_details') or 'validation failed'}")


@app.command("list")
@friendly
def files_list(
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print the file objects as JSON.")] = False,
) -> None:
    """List your uploaded files."""
    with client() as c:
        items = c.list_files(limit)
    if as_json:
        print_json(items)
        return
    table = list_table(("file", "name", "status", "examples", "bytes", "created"))
    for f in items:
        table.add_row(f["id"], f["filename"], f["status"], str((f.get("validation") or {}).get("examples", "-")),
                      str(f["bytes"]), when(f["created_at"], "%m-%d %H:%M"))
    out.print(table)


@app.command("show")
@friendly
def files_show(
    file_id: Annotated[str, typer.Argument(metavar="FILE", help="A file id (file-...).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the file object as JSON.")] = False,
) -> None:
    """Show a file and its validation report (format, examples, tokens, bad lines)."""
    with client() as c:
        f = c.get_file(file_id)
    if as_json:
        print_json(f)
        return
    print_rows(report_rows(f))
    if f.get("status") != "processed":
        show_bad_lines(Path(f["filename"]), f)
