"""The service's own source, read as syntax: nothing hands text to a shell, runs pickles or remote code.

A grep would miss `shell = True` spelled across lines and flag comments; the AST sees calls.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("api", "core", "worker", "trainer", "tuneq", "migrations")
# Calls that run a command line through a shell, or evaluate text as code.
SHELL_CALLS = {
    ("os", "system"), ("os", "popen"), ("subprocess", "getoutput"), ("subprocess", "getstatusoutput"),
    ("pty", "spawn"),
}
CODE_CALLS = {"eval", "exec"}
UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("dill", "load"), ("joblib", "load"), ("marshal", "loads")}


def sources() -> list[Path]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    assert len(files) > 30  # the walk found the code
    return files


def _name(node: ast.AST) -> tuple[str, ...]:
    if isinstance(node, ast.Name):
        return (node.id,)
    if isinstance(node, ast.Attribute):
        return (*_name(node.value), node.attr)
    return ()


def findings(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        where = f"line {node.lineno}: {'.'.join(name) or '<call>'}"
        shell = kw.get("shell")
        if shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
            found.append(f"{where} passes shell={ast.unparse(shell)}")
        if name[-2:] in SHELL_CALLS:
            found.append(f"{where} runs a shell")
        if name in {(c,) for c in CODE_CALLS}:
            found.append(f"{where} evaluates text as code")
        if name[-2:] in UNPICKLERS:
            found.append(f"{where} unpickles")
        if name[-1:] == ("load",) and name[:-1] == ("torch",):
            wo = kw.get("weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                found.append(f"{where} without weights_only=True")
        trc = kw.get("trust_remote_code")
        if trc is not None and isinstance(trc, ast.Constant) and trc.value is not False:
            found.append(f"{where} switches trust_remote_code on")
        if name[-1:] == ("from_pretrained",) and name[:1] == ("AutoModelForCausalLM",):
            st = kw.get("use_safetensors")
            spread = any(k.arg is None for k in node.keywords)
            if not spread and not (isinstance(st, ast.Constant) and st.value is True):
                found.append(f"{where} may load pickled weights (use_safetensors)")
    return found


def test_no_shell_pickle_or_remote_code_in_the_service() -> None:
    bad = []
    for path in sources():
        for finding in findings(ast.parse(path.read_text(), str(path))):
            bad.append(f"{path.relative_to(ROOT)} {finding}")
    assert bad == []


@pytest.mark.parametrize(
    "code",
    [
        "subprocess.run(cmd, shell=True)",
        "subprocess.Popen(cmd,\n    shell = flag)",
        "os.system('tar x ' + name)",
        "os.popen(cmd)",
        "eval(user_text)",
        "pickle.loads(blob)",
        "torch.load(path)",
        "torch.load(path, weights_only=False)",
        "AutoTokenizer.from_pretrained(name, trust_remote_code=True)",
        "AutoModelForCausalLM.from_pretrained(name, dtype=x)",
    ],
)
def test_the_scan_catches_what_it_looks_for(code: str) -> None:
    assert findings(ast.parse(code))


def test_model_loading_asks_for_safetensors() -> None:
    import trainer.model

    text = Path(trainer.model.__file__).read_text()
    assert '"use_safetensors": True' in text


def test_remote_code_only_for_listed_models(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from trainer.model import remote_code_allowed

    monkeypatch.delenv("TUNEQ_TRUST_REMOTE_CODE_MODELS", raising=False)
    assert not remote_code_allowed("org/model") and not remote_code_allowed(str(tmp_path))
    monkeypatch.setenv("TUNEQ_TRUST_REMOTE_CODE_MODELS", f'["org/model", "{tmp_path}/m"]')
    assert remote_code_allowed("org/model") and remote_code_allowed(f"{tmp_path}/x/../m")
    assert not remote_code_allowed("org/other") and not remote_code_allowed(f"{tmp_path}/n")
    monkeypatch.setenv("TUNEQ_TRUST_REMOTE_CODE_MODELS", "not json")
    assert not remote_code_allowed("org/model")


def test_a_job_cannot_ask_for_remote_code() -> None:
    from pydantic import ValidationError

    from api.schemas import CreateJobRequest
    from trainer.spec import JobSpec

    with pytest.raises(ValidationError):
        CreateJobRequest.model_validate({"model": "m", "training_file": "f", "trust_remote_code": True})
    with pytest.raises(ValidationError):
        JobSpec.model_validate({"model": "/m", "training_file": "/f", "trust_remote_code": True})
