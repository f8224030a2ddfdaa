"""How fast a job runs on a given GPU model, from speeds measured there (speeds.json, beside this).

A measured run gives tokens/s for a setting ("lora lean", "full fast bf16", ...) on one model
shape. Its efficiency is the share of the GPU's peak it reached by the planner's own FLOP count
(trainer.planning.compute): FLOPs per token x tokens/s / peak. The same share applied to another
job's FLOPs gives its compute time, so that the estimate carries what the measured step cost
beyond its matmuls (attention kernels, norms, optimizer, host work) to other shapes and lengths.

Start-up is a fixed part plus loading the weights, per GiB. Its fixed part depends on how the
trainer starts. A fresh process (`python -m trainer run`, a job of several processes) imports torch,
transformers and the trainer first: `fixed_s`, from its start to its first step. A one-process
job on the service starts in a process that has done those imports already (forked from the
worker's template, or a standby trainer): `warm_fixed_s`, measured from the job's submission to
its first step seen through the API (file check, queue on an idle worker, data, preparation, the
first step), so that it is what a user waits.

A checkpoint costs a fixed part plus its bytes (trainer.planning.compute.checkpoint_bytes) at a
measured rate: copying the states off the GPU, serialising, writing and hashing them (the manifest's
sha256) on that host's disk. A GPU model without a measured "checkpoint" entry gets
DEFAULT_CHECKPOINT.

A setting this GPU model has not measured is looked up, in order, as itself, without its
qualifier (bf16), and at the method's other speed; each on this GPU, else carried over from
another GPU model as a ratio (speed_for). An unknown GPU model or method gets the planner's
DEFAULT_EFFICIENCY. The estimate names where its efficiency came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

SPEEDS_FILE = Path(__file__).with_name("speeds.json")
# For a host with no measured checkpoint rate: about what the lent H100 host measured, rounded down.
DEFAULT_CHECKPOINT = {"fixed_s": 0.1, "gib_per_s": 0.4,
                      "source": "default (no checkpoint rate measured on this GPU model's host)"}


@dataclass(frozen=True)
class Speed:
    efficiency: float
    peak_tflops: float
    source: str


def setting_key(method: str, speed: str, full_precision: str | None = None) -> str:
    """'lora lean', 'full fast bf16': balanced counts as lean (its recompute, at worst)."""
    key = f"{method} {'lean' if speed == 'balanced' else speed}"
    if method in ("full", "freeze") and full_precision == "bf16":
        key += " bf16"
    return key


@lru_cache(maxsize=4)
def _table(path: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {"gpus": {}}


def table(path: Path | None = None) -> dict[str, Any]:
    return _table(str(path or SPEEDS_FILE))


def gpu_entry(gpu_model: str | None, data: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]] | None:
    """(name, entry) of the GPU model whose `match` strings occur in gpu_model (any case)."""
    if not gpu_model:
        return None
    data = data or table()
    wanted = gpu_model.lower()
    for name, entry in data.get("gpus", {}).items():
        if any(m.lower() in wanted for m in entry.get("match", [name])):
            return name, entry
    return None


@lru_cache(maxsize=64)
def _flops_per_token(model: str, method: str, speed: str, seq_len: int, lora_r: int) -> float:
    from trainer.planning.compute import estimate_compute
    from trainer.spec import LoraSettings
    from trainer.tiny import build_config

    c = estimate_compute(build_config(model), method=method, tokens=1, seq_len=seq_len,
                         gradient_checkpointing=speed == "lean", lora=LoraSettings(r=lora_r))
    return c.flops_per_token


def run_efficiency(run: dict[str, Any], peak_tflops: float) -> float:
    method, speed = run["setting"].split()[:2]
    per_token = _flops_per_token(run["model"], method, speed, int(run["seq_len"]), int(run.get("lora_r", 16)))
    return per_token * float(run["tokens_per_second"]) / (peak_tflops * 1e12)


def _candidates(key: str) -> list[str]:
    method, speed, *rest = key.split()
    other = "fast" if speed == "lean" else "lean"
    out = [key]
    if rest:
        out.append(f"{method} {speed}")
    return out + [f"{method} {other}" + (f" {' '.join(rest)}" if rest else ""), f"{method} {other}"]


def _runs(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["setting"]: r for r in entry.get("runs", [])}


def speed_for(gpu_model: str | None, key: str, data: dict[str, Any] | None = None) -> Speed | None:
    """The measured efficiency for this GPU model and setting (see the module docstring); None
    for a GPU model the table does not know, or a method measured nowhere.

    A setting measured only on another GPU model is carried over as a ratio: its efficiency there
    over that of a setting both GPUs measured (of the same method, else the same speed, where
    possible), times this GPU's efficiency of that one. Peaks are per GPU model (a data sheet's or a measured matmul rate), so
    efficiencies are comparable between settings of one GPU, not between GPUs."""
    data = data or table()
    found = gpu_entry(gpu_model, data)
    if found is None:
        return None
    name, entry = found
    peak = float(entry["peak_tflops"])
    here = _runs(entry)
    for wanted in _candidates(key):
        if wanted in here:
            return Speed(run_efficiency(here[wanted], peak), peak, f"{name} {wanted} ({here[wanted].get('source', '')})")
        for other, o_entry in data.get("gpus", {}).items():
            there = _runs(o_entry)
            if other == name or wanted not in there:
                continue
            # The anchor: of the same method where possible, else of the same speed; then by name.
            shared = sorted(set(here) & set(there), key=lambda k: (k.split()[0] != wanted.split()[0],
                                                                   k.split()[1] != wanted.split()[1], k))
            if not shared:
                continue
            anchor, o_peak = shared[0], float(o_entry["peak_tflops"])
            ratio = run_efficiency(there[wanted], o_peak) / run_efficiency(there[anchor], o_peak)
            eff = min(1.0, run_efficiency(here[anchor], peak) * ratio)
            return Speed(eff, peak, f"{name} {anchor} x ({wanted} / {anchor} on {other})")
    return None


def stored_weight_bytes(total_params: int) -> int:
    """Bytes the start-up's load reads and places on the GPU: the weights in bf16, whatever the
    method keeps there after (QLoRA quantizes them, full may add fp32 masters). The load rate of
    speeds.json is fit per GiB of these."""
    return 2 * total_params


def startup_seconds(gpu_model: str | None, weight_bytes: float, data: dict[str, Any] | None = None,
                    warm: bool = False) -> tuple[float, str]:
    """Seconds to the first step for weights of `weight_bytes`: from a fresh trainer's start, or
    (warm) from the submission of a job whose trainer's imports were done before it came."""
    data = data or table()
    gpus = data.get("gpus", {})
    found = gpu_entry(gpu_model, data) or next(iter(gpus.items()), None)
    if found is None:
        return 0.0, "no start-up measured"
    # A GPU model whose start-up no run measured borrows the first measured one's, and says so.
    measured = found if "startup" in found[1] else next(((n, e) for n, e in gpus.items() if "startup" in e), None)
    if measured is None:
        return 0.0, "no start-up measured"
    s = measured[1]["startup"]
    warm = warm and "warm_fixed_s" in s
    fixed = float(s["warm_fixed_s"] if warm else s.get("fixed_s", 0.0))
    seconds = fixed + float(s.get("load_s_per_gib", 0.0)) * weight_bytes / 1024**3
    how = "imports done before the job" if warm else "a fresh trainer process"
    where = found[0] if measured is found else f"{found[0]} (none measured there: {measured[0]}'s)"
    return seconds, f"{where}, {how}: {s.get('warm_source' if warm else 'source', '')}"


def checkpoint_seconds(gpu_model: str | None, checkpoint_bytes: float,
                       data: dict[str, Any] | None = None) -> tuple[float, str]:
    """Seconds to write one checkpoint of `checkpoint_bytes` on this GPU model's host."""
    found = gpu_entry(gpu_model, data or table())
    rate = (found[1].get("checkpoint") if found else None) or DEFAULT_CHECKPOINT
    seconds = float(rate["fixed_s"]) + checkpoint_bytes / 1024**3 / float(rate["gib_per_s"])
    where = f"{found[0]}: " if found and found[1].get("checkpoint") else ""
    return seconds, where + str(rate.get("source", ""))
