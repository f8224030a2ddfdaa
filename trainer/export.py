"""DIR/final/: what a job produces, and manifest.json describing every file in it."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from trainer.events import EventWriter, json_safe
from trainer.spec import JobSpec

FINAL = "final"
MANIFEST = "manifest.json"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_final(
    out_dir: Path, model: Any, tokenizer: Any, spec: JobSpec, metrics: dict[str, Any], events: EventWriter, precision: str
) -> Path:
    """Save the adapter (lora, qlora) or the whole model (full) with its tokenizer; rank 0 only."""
    final = Path(out_dir) / FINAL
    final.mkdir(parents=True, exist_ok=True)
    if spec.method == "full" and precision == "bf16":
        # fp32 master weights served their purpose; users load and serve the model in bf16.
        model = model.to(torch.bfloat16)
    # A PeftModel saves only the adapter: adapter_config.json + adapter_model.safetensors.
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)

    files = {}
    for path in sorted(p for p in final.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[str(path.relative_to(final))] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    manifest = {
        "format": "peft-adapter" if spec.method in ("lora", "qlora") else "full-model",
        "base_model": spec.model,
        "method": spec.method,
        "created": time.time(),
        "spec": spec.model_dump(mode="json"),
        "metrics": json_safe(metrics),
        "files": files,
    }
    (final / MANIFEST).write_text(json.dumps(manifest, indent=1, allow_nan=False, default=str))
    files[MANIFEST] = {"bytes": (final / MANIFEST).stat().st_size, "sha256": sha256_of(final / MANIFEST)}
    for name, info in files.items():
        events.emit("artifact", f"saved {FINAL}/{name}", path=f"{FINAL}/{name}", **info)
    return final
