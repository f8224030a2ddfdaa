"""The data checks the API runs import no torch and no transformers: checking an upload must not
load them (seconds and hundreds of MiB per API process)."""

from __future__ import annotations

import json
import subprocess
import sys


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; import json; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_validating_a_file_imports_neither_torch_nor_transformers(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    loaded = _modules_after(
        f"from trainer.data.validate import validate_file; assert validate_file({str(path)!r})['valid']"
    )
    assert "trainer.data.validate" in loaded
    assert not {m for m in loaded if m.split(".")[0] in ("torch", "transformers")}


def test_the_batches_do_need_torch():
    # The check above could pass by importing nothing at all; batching is where torch belongs.
    assert "torch" in _modules_after("import trainer.data.batch")
