"""The Unsloth peer runner (bench/peers_unsloth.py) runs only on the lent GPU; here it must refuse
what it cannot measure at once, naming the reason, instead of hanging or measuring the wrong thing."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "peers_unsloth.py"


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("peers_unsloth", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"method": "dora"}, "method"), ({"steps": 0}, "steps"), ({"warmup": 0}, "warmup"), ({"batch": 0}, "batch")],
)
def test_bad_settings_name_the_field(peers, overrides: dict, field: str) -> None:
    row = {"method": "lora", "gradient_checkpointing": True, "batch": 2, "seq": 64, "warmup": 1, "steps": 2}
    with pytest.raises(ValueError, match=f"^{field}: "):
        peers.run_unsloth(**{**row, **overrides}, dry_run=True)


def test_refuses_a_process_that_imported_transformers_first(peers) -> None:
    # Unsloth patches transformers as it is imported; a late import would measure unpatched code.
    import transformers  # noqa: F401

    with pytest.raises(peers.PeerUnavailable, match="Unsloth must come first"):
        peers.run_unsloth("lora", True, 2, 64, 1, 2, dry_run=True)


def test_cli_without_unsloth_says_how_to_carry_it() -> None:
    # sys.modules[name] = None makes that import fail, whatever this machine has installed.
    code = (
        "import runpy, sys; sys.modules['unsloth'] = None; "
        f"sys.argv = [{str(SCRIPT)!r}, '--method', 'qlora', '--dry-run']; "
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert "unsloth is not importable" in done.stderr
    assert "tar xzf .devsite/site.tar.gz" in done.stderr
    assert done.stdout.strip() == ""
