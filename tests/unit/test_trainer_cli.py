"""The trainer as the worker runs it: a process with exit codes, signals and one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.events import read_events
from trainer.loop import TEST_STEP_SLEEP_ENV

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def trainer(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "trainer", *args], cwd=ROOT, capture_output=True, text=True, timeout=120, **kw)


def write_spec(path: Path, spec) -> Path:
    path.write_text(spec.model_dump_json())
    return path


def start(spec_path: Path, out: Path, *extra: str) -> subprocess.Popen:
    """A trainer of a job that runs until the test signals it: it sleeps briefly after each step
    (trainer.loop), so that it does not take a whole core while the test waits."""
    # Its own session, like the worker starts it: signals go to the whole process group.
    return subprocess.Popen(
        [PYTHON, "-m", "trainer", "run", str(spec_path), "--out", str(out), *extra],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, TEST_STEP_SLEEP_ENV: "0.05"},
    )


def wait_for(out: Path, predicate, timeout: float = 90.0) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        events = read_events(out / "events.jsonl")
        if predicate(events):
            return events
        time.sleep(0.1)
    raise AssertionError(f"timed out; events: {read_events(out / 'events.jsonl')[-3:]}")


def metrics_after(n_starts: int):
    def check(events: list[dict]) -> bool:
        starts = [i for i, e in enumerate(events) if e["type"] == "start"]
        return len(starts) >= n_starts and any(e["type"] == "metrics" for e in events[starts[n_starts - 1]:])
    return check


def test_invalid_spec_is_one_line_and_exit_2(tmp_path: Path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model": "m", "training_file": "t.jsonl", "hyperparameters": {"batch_size": 0}}))
    res = trainer("run", str(spec), "--out", str(tmp_path / "out"))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "hyperparameters.batch_size" in lines[0], res.stderr
    error = read_events(tmp_path / "out" / "events.jsonl")[-1]
    assert error["type"] == "error" and error["data"]["code"] == "config" and "batch_size" in error["message"]

    res = trainer("run", str(tmp_path / "missing.json"), "--out", str(tmp_path / "out"))
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1

    spec.write_text("{not json")
    res = trainer("run", str(spec), "--out", str(tmp_path / "out"))
    assert res.returncode == 2 and "Traceback" not in res.stderr

    res = trainer("frobnicate")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1


def test_validate_prints_the_report(tmp_path: Path, tiny_model_dir: Path, chat_files, capsys):
    """In this process: the command's own code, its report and exit codes (that validation imports no
    torch is test_trainer_data_imports')."""
    from trainer.cli import main

    def validate(*args: str) -> tuple[int, dict]:
        code = main(["validate", *args])
        return code, json.loads(capsys.readouterr().out)

    code, report = validate(str(chat_files["train"]), "--model", str(tiny_model_dir), "--max-seq-len", "16")
    assert code == 0, report
    assert report["valid"] and report["examples"] == 48 and report["truncated"] > 0 and report["tokens"] == 48 * 16

    bad = tmp_path / "bad.jsonl"
    bad.write_text("{}\n")
    code, report = validate(str(bad))
    assert code == 1 and report["error_counts"] == {"unknown_format": 1}
    code, report = validate(str(bad), "--format", "chat")
    assert code == 1 and report["error_counts"] == {"missing_messages": 1}


def test_tiny_is_deterministic_per_seed(tmp_path: Path, tiny_model_dir: Path):
    from trainer.tiny import build_tiny

    def digest(d: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}

    res = trainer("tiny", str(tmp_path / "a"), "--seed", "0")
    assert res.returncode == 0, res.stderr
    again = digest(tmp_path / "a")
    assert again == digest(tiny_model_dir)
    # The seed picks the weights, the tokenizer stays: seen on the untrained weights, which the
    # seed alone sets (pretraining from them is deterministic, as the equal digests above show).
    zero = digest(build_tiny(tmp_path / "b0", seed=0, pretrain_steps=0))
    other = digest(build_tiny(tmp_path / "b1", seed=1, pretrain_steps=0))
    assert other["model.safetensors"] != zero["model.safetensors"]
    assert other["tokenizer.json"] == zero["tokenizer.json"] == again["tokenizer.json"]
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and 512 <= config["vocab_size"] <= 1000
    assert config["num_key_value_heads"] == 2 and config["max_position_embeddings"] == 2048
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.bos_token and tok.eos_token and tok.pad_token and tok.pad_token_id != tok.eos_token_id
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")
    done = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], tokenize=False)
    assert "Hello" + tok.eos_token in done


@pytest.mark.parametrize(("shape", "billions"), [("llama-0.5b", 0.49), ("llama-3.2-1b", 1.24), ("llama-3.2-3b", 3.21), ("llama-3-8b", 8.03)])
def test_benchmark_shapes_have_their_sizes(shape: str, billions: float):
    import torch
    from transformers import LlamaForCausalLM

    from trainer.tiny import build_config

    with torch.device("meta"):
        model = LlamaForCausalLM(build_config(shape))
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.01)


def test_sigusr1_pauses_with_a_checkpoint_resume_continues_and_sigterm_cancels_promptly(make_spec, tmp_path: Path):
    """One job through the worker's three signals: SIGUSR1 pauses it, --resume continues it, and
    SIGTERM cancels the resumed run promptly (one trainer fewer than a separate cancel test)."""
    spec = write_spec(tmp_path / "spec.json", make_spec("lora", hyperparameters={"max_steps": 100_000}))
    out = tmp_path / "out"
    proc = start(spec, out)
    wait_for(out, metrics_after(1))
    # A lora job on a plain base never imports bitsandbytes (trainer.startup.skip_unused_libraries).
    startup = next(e for e in read_events(out / "events.jsonl") if e["type"] == "startup")
    assert set(startup["data"]["detail"]["skipped_libraries"]) == {"bitsandbytes", "boto3"}
    os.killpg(proc.pid, signal.SIGUSR1)
    assert proc.wait(timeout=60) == 75, proc.stderr.read()

    events = read_events(out / "events.jsonl")
    assert events[-1]["type"] == "checkpoint"
    step = events[-1]["data"]["step"]
    saved = out / events[-1]["data"]["path"]
    assert saved.name == f"step-{step:08d}"
    state = json.loads((saved / "state.json").read_text())
    assert state["train_state"]["step"] == step
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt"} <= {p.name for p in saved.iterdir()}
    assert not any(e["type"] in ("finished", "error") for e in events)

    proc = start(spec, out, "--resume")
    events = wait_for(out, metrics_after(2))
    sent = time.time()
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    assert time.time() - sent < 10
    assert "Traceback" not in proc.stderr.read()
    assert not (out / "final").exists()
    resumed = [e for e in events if e["type"] == "start"][-1]["data"]
    assert resumed["resumed_from_step"] == step
    first_after = next(e for e in events[events.index(next(e for e in events if e["data"] == resumed)):] if e["type"] == "metrics")
    assert first_after["data"]["step"] == step + 1


def test_pause_file_pauses_without_a_signal(make_spec, tmp_path: Path):
    """The worker's second channel: with SIGUSR1 ignored, the file alone pauses the trainer."""
    from trainer.signals import PAUSE_FILE

    spec = write_spec(tmp_path / "spec.json", make_spec("lora", hyperparameters={"max_steps": 100_000}))
    out = tmp_path / "out"
    proc = start(spec, out)
    wait_for(out, metrics_after(1))
    (out / PAUSE_FILE).touch()
    assert proc.wait(timeout=60) == 75, proc.stderr.read()
    events = read_events(out / "events.jsonl")
    assert events[-1]["type"] == "checkpoint"
    assert "asked by pause file" in proc.stderr.read()


def test_runs_under_accelerate_launch(make_spec, tmp_path: Path):
    spec = write_spec(tmp_path / "spec.json", make_spec("lora", hyperparameters={"max_steps": 4}))
    out = tmp_path / "out"
    launcher = Path(PYTHON).parent / "accelerate"
    if not launcher.exists():
        pytest.fail(f"accelerate launcher missing at {launcher}")
    res = subprocess.run(
        [str(launcher), "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--cpu", "-m", "trainer", "run", str(spec), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    kinds = [e["type"] for e in read_events(out / "events.jsonl")]
    assert kinds[0] == "start" and kinds[-1] == "finished" and kinds.count("metrics") == 4
    assert (out / "final" / "adapter_model.safetensors").is_file()


# The global batch of the distributed runs below: 4 examples a step, over an accumulation window of 2.
DIST_HP = {"max_steps": 4, "gradient_accumulation_steps": 2, "learning_rate": 3e-3}


def metrics(out: Path) -> list[tuple[float, float]]:
    return [(e["data"]["train_loss"], e["data"]["grad_norm"]) for e in read_events(out / "events.jsonl")
            if e["type"] == "metrics"]


@pytest.fixture(scope="session")
def one_rank(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, chat_files) -> Path:
    """The work dir of one rank trained on DIST_HP with batch 4: what the distributed runs of the
    same global batch must match (make_spec's defaults, on the same rows: chat_files is made alike
    in every process). Trained once per run: the first process to need it trains it in the
    directory the run's processes share, as tiny_model_dir is built. In this process (the trainer's
    command line is tested above; here only its numbers matter), on one thread like each rank."""
    import fcntl

    import torch

    from trainer.job import run_job
    from trainer.spec import JobSpec

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out, done = root / "one-rank", root / "one-rank.done"
    with open(root / "one-rank.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            spec = JobSpec.model_validate({
                "model": str(tiny_model_dir), "method": "lora", "training_file": str(chat_files["train"]),
                "hyperparameters": {"batch_size": 4, "max_seq_len": 64, "warmup_steps": 2, **DIST_HP},
                "schedule": {"log_every_steps": 1},
            })
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                assert run_job(spec, out) == 0, read_events(out / "events.jsonl")[-3:]
            finally:
                torch.set_num_threads(threads)
            done.touch()
    return out


def test_two_ranks_match_one_rank_with_the_same_global_batch(make_spec, tmp_path: Path, one_rank: Path):
    # DDP on CPU (gloo): 2 ranks x batch 2 see the same examples per step as 1 rank x batch 4.
    # Ranks hold different numbers of label tokens, so only a loss normalised over the tokens
    # of all ranks (and the accumulation window) gives the same losses and gradients.
    torchrun = Path(PYTHON).parent / "torchrun"
    two = write_spec(tmp_path / "two.json", make_spec("lora", hyperparameters={**DIST_HP, "batch_size": 2},
                                                      schedule={"checkpoint_every_steps": 2}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "trainer", "run", str(two), "--out",
                          str(tmp_path / "two")], cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    assert res.returncode == 0, res.stderr[-2000:]

    a, b = metrics(one_rank), metrics(tmp_path / "two")
    assert len(a) == len(b) == 4
    for (loss_a, norm_a), (loss_b, norm_b) in zip(a, b, strict=True):
        assert loss_b == pytest.approx(loss_a, rel=1e-5) and norm_b == pytest.approx(norm_a, rel=1e-4)
    events = read_events(tmp_path / "two" / "events.jsonl")
    assert sum(e["type"] == "start" for e in events) == 1, "only rank 0 writes events"
    import torch

    rng = torch.load(tmp_path / "two" / "checkpoints" / "step-00000004" / "rng.pt", weights_only=True)
    assert len(rng) == 2, "the RNG state of every rank is saved"


def test_two_hosts_of_one_rank_each_match_one_rank_with_the_same_global_batch(make_spec, tmp_path: Path,
                                                                             one_rank: Path):
    # The launch a job across two hosts gets: each host runs the worker's command for its own node
    # (its own work dir and spec copy) against the leader's rendezvous; gloo carries the gradients.
    from core.settings import Settings
    from core.ports import free_port
    from worker.workdir import Rendezvous, trainer_argv

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    hosts = []
    for node in (0, 1):
        out = tmp_path / f"node{node}"
        out.mkdir()
        spec = write_spec(out / "spec.json", make_spec("lora", hyperparameters={**DIST_HP, "batch_size": 2}, nodes=2))
        argv = trainer_argv(Settings(accelerate_launch=True), spec, out, resume=False,
                            rendezvous=Rendezvous("127.0.0.1", port, nodes=2, node_rank=node))
        hosts.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for h in hosts:
        _, err = h.communicate(timeout=240)
        assert h.returncode == 0, err[-2000:]

    a, b = [m[0] for m in metrics(one_rank)], [m[0] for m in metrics(tmp_path / "node0")]
    assert len(a) == len(b) == 4 and b == pytest.approx(a, rel=1e-5)
    assert not (tmp_path / "node1" / "events.jsonl").exists(), "events come from rank 0 only"
    assert (tmp_path / "node0" / "final" / "adapter_model.safetensors").is_file()
