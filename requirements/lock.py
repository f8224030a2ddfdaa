"""Makes and checks the dependency locks: every package, transitive ones included, with hashes,
for each platform tuneq installs on. `make lock` runs `lock.py compile`; `make test` (through
tests/unit/test_dependency_lock.py) and `lock.py check` fail when pyproject.toml and a lock disagree.

Each lock starts with a digest of its inputs (pyproject.toml's requires-python, dependencies and
extras, and the requirements/*.in files), so any change to them that was not re-locked shows.
uv (pinned in tools.txt) resolves; re-running keeps every existing pin that still fits (the old
lock is its preference), so only what changed moves unless LOCK_ARGS asks for upgrades.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIGEST_LINE = "# inputs-sha256: {} (pyproject.toml's dependencies and extras, requirements/*.in); refresh with `make lock`"


@dataclass(frozen=True)
class Lock:
    name: str
    python: str
    why: str
    extras: tuple[str, ...] = ()  # pyproject's dependencies plus these extras
    source: str | None = None  # else this .in file under requirements/
    names_only: bool = False  # the .in file names packages; their versions come from pyproject.toml
    no_deps: bool = False  # the .in file is already the whole closure
    skip: tuple[str, ...] = ()  # left out: the target already has them (built against its own libs)
    extra_args: tuple[str, ...] = ()  # more uv arguments


LOCKS = (
    # CI and developers: this kind of machine carries the CPU build of torch as a file that pip's
    # configuration finds (find-links); its hash is that file's sha256.
    Lock("cpu.txt", "3.11", "CPU test machines (make up / make test)", extras=("test",),
         extra_args=("--find-links", "/opt/wheels")),
    # The CUDA image: PyPI's Linux torch is the CUDA build, its CUDA libraries come as wheels.
    Lock("cuda.txt", "3.12", "the CUDA image (Dockerfile)", extras=("deploy", "gpu")),
    Lock("device-site.txt", "3.12", "the lent GPU's trainer packages (bench/device_site.sh)",
         source="device-site.in", no_deps=True),
    # numpy, protobuf, psutil, pyyaml, markupsafe: compiled, and the device image has its own.
    Lock("device-svc.txt", "3.12", "the lent GPU's service stack (bench/device_svc.sh)",
         source="device-svc.in", names_only=True,
         skip=("numpy", "protobuf", "psutil", "pyyaml", "setuptools", "packaging", "markupsafe")),
    # uv itself, which `make lock` installs from here before it runs it.
    Lock("tools.txt", "3.11", "the locking tool (make lock)", source="tools.in"),
)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project(root: Path) -> dict:
    return tomllib.loads((root / "pyproject.toml").read_text())["project"]


def pins(specs: list[str]) -> dict[str, str]:
    """{canonical name: version} of the `name[extras]==version` lines of pyproject.toml."""
    out = {}
    for spec in specs:
        m = re.fullmatch(r"\s*([A-Za-z0-9._-]+)(\[[^\]]*\])?\s*==\s*([^\s;]+)\s*", spec)
        if not m:
            raise SystemExit(f"pyproject.toml: {spec!r} is not pinned with == (the locks start from exact pins)")
        out[canonical(m[1])] = m[3]
    return out


def inputs_digest(root: Path) -> str:
    p = project(root)
    data = {
        "requires-python": p.get("requires-python"),
        "dependencies": p["dependencies"],
        "optional-dependencies": p.get("optional-dependencies", {}),
        "in": {f.name: f.read_text() for f in sorted((root / "requirements").glob("*.in"))},
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def direct_pins(root: Path, lock: Lock) -> dict[str, str]:
    """What the lock must hold at exactly pyproject.toml's version."""
    p = project(root)
    every = pins(p["dependencies"] + [d for ds in p.get("optional-dependencies", {}).values() for d in ds])
    if lock.source is None:
        wanted = pins(p["dependencies"] + [d for e in lock.extras for d in p["optional-dependencies"][e]])
        return {n: v for n, v in wanted.items() if n not in lock.skip}
    # A device bundle: whatever of pyproject's pins it holds must be pyproject's version.
    held = read_lock(root / "requirements" / lock.name)
    return {n: v for n, v in every.items() if n in held}


def read_lock(path: Path) -> dict[str, tuple[str, bool]]:
    """{canonical name: (version, hashed)} of a requirements file written by uv."""
    out: dict[str, tuple[str, bool]] = {}
    text = re.sub(r"\\\n", " ", path.read_text())
    for line in text.splitlines():
        if not line or line[0] in "# -":
            continue
        m = re.match(r"([A-Za-z0-9._-]+)(\[[^\]]*\])?==(\S+)", line)
        if m:
            out[canonical(m[1])] = (m[3], "--hash=sha256:" in line)
    return out


def problems(root: Path = ROOT) -> list[str]:
    """Every way the locks under root/requirements disagree with root/pyproject.toml."""
    found = []
    digest = inputs_digest(root)
    for lock in LOCKS:
        path = root / "requirements" / lock.name
        rel = f"requirements/{lock.name}"
        if not path.exists():
            found.append(f"{rel} is missing: run `make lock`")
            continue
        first = path.read_text().partition("\n")[0]
        if first != DIGEST_LINE.format(digest):
            found.append(f"{rel} was locked from other inputs than pyproject.toml and requirements/*.in hold now: run `make lock`")
        held = read_lock(path)
        for name, (version, hashed) in held.items():
            if not hashed:
                found.append(f"{rel}: {name}=={version} has no hash")
        for name, version in direct_pins(root, lock).items():
            if name not in held:
                found.append(f"{rel} lacks {name} (pyproject.toml pins {name}=={version}): run `make lock`")
            # A local label names the build (torch's +cpu), not another release.
            elif held[name][0].split("+")[0] != version:
                found.append(f"{rel} holds {name}=={held[name][0]}, pyproject.toml pins {version}: run `make lock`")
    return found


def compile_all(uv: str, args: list[str]) -> None:
    root = ROOT
    p = project(root)
    digest = inputs_digest(root)
    every = pins(p["dependencies"] + [d for ds in p.get("optional-dependencies", {}).values() for d in ds])
    with tempfile.TemporaryDirectory() as tmp:
        for lock in LOCKS:
            out = root / "requirements" / lock.name
            cmd = [uv, "pip", "compile", "--quiet", "--generate-hashes", "--python-version", lock.python,
                   "--python-platform", "x86_64-manylinux_2_28", "--custom-compile-command", "make lock",
                   "--output-file", str(out), *lock.extra_args, *args]
            if lock.source is None:
                cmd += ["pyproject.toml", *(f"--extra={e}" for e in lock.extras)]
            elif lock.names_only:
                # A name may carry extras (moto[s3]): the pin is the name's, the extras go along.
                names = [re.fullmatch(r"([A-Za-z0-9._-]+)(\[[^\]]*\])?", line.strip()).groups("")  # type: ignore[union-attr]
                         for line in (root / "requirements" / lock.source).read_text().splitlines()
                         if line.strip() and not line.startswith("#")]
                missing = [n for n, _ in names if canonical(n) not in every]
                if missing:
                    raise SystemExit(f"requirements/{lock.source}: no pin in pyproject.toml for {', '.join(missing)}")
                spec = Path(tmp) / lock.source
                spec.write_text("".join(f"{canonical(n)}{x}=={every[canonical(n)]}\n" for n, x in names))
                cmd.append(str(spec))
            else:
                cmd.append(f"requirements/{lock.source}")
            cmd += ["--no-deps"] if lock.no_deps else []
            cmd += [f"--no-emit-package={n}" for n in lock.skip]
            print(f"lock: requirements/{lock.name} ({lock.why}, Python {lock.python})", flush=True)
            subprocess.run(cmd, cwd=root, check=True)
            body = out.read_text()
            if body.startswith("# inputs-sha256:"):
                body = body.partition("\n")[2]
            # The temporary spec file's path would differ run to run; name the .in file instead.
            body = body.replace(str(Path(tmp) / (lock.source or "")), f"requirements/{lock.source}")
            out.write_text(DIGEST_LINE.format(digest) + "\n" + body)
    left = problems(root)
    if left:
        raise SystemExit("\n".join(["lock: the new locks still disagree with pyproject.toml:", *left]))


def main(argv: list[str]) -> int:
    if argv[:1] == ["compile"] and len(argv) >= 2:
        compile_all(argv[1], argv[2:])
        return 0
    if argv == ["check"]:
        found = problems()
        print("\n".join(found) or "locks agree with pyproject.toml")
        return 1 if found else 0
    print("usage: lock.py compile UV [uv pip compile args...] | lock.py check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
