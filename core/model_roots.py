"""Base models that this service may train: local directories under the configured model roots.

A model name comes from a user, so it is resolved like an untrusted path: no absolute paths, no
`..`, and the resolved directory (symlinks followed) must still lie inside its root. Otherwise a
job could read any directory the worker can see.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from core.settings import Settings, get_settings

# Hub ids look like "org/name" or "name"; nothing else is sent to from_pretrained.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
# org/name directories (like a hub cache laid out by hand) are found one level down.
_MAX_DEPTH = 2


class ModelNotFound(ValueError):
    """The name is not a usable base model; `available` lists those that are."""

    def __init__(self, message: str, available: list[str]):
        super().__init__(message)
        self.available = available


@dataclass(frozen=True)
class BaseModelDir:
    name: str
    path: Path
    created_at: float


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def list_models(settings: Settings | None = None) -> list[BaseModelDir]:
    """Every directory with a config.json under a model root, by name; the first root wins a name."""
    settings = settings or get_settings()
    found: dict[str, BaseModelDir] = {}
    for root in settings.model_roots:
        root = Path(root).resolve()
        if not root.is_dir():
            continue
        for name, path in _walk(root, root, depth=1):
            if name not in found:
                found[name] = BaseModelDir(name=name, path=path, created_at=path.stat().st_mtime)
    return sorted(found.values(), key=lambda m: m.name)


def _walk(root: Path, here: Path, depth: int):  # noqa: ANN202 - a private generator
    try:
        children = sorted(here.iterdir())
    except OSError:
        return
    for child in children:
        if child.name.startswith(".") or not child.is_dir():
            continue
        resolved = child.resolve()
        if not _inside(resolved, root):
            continue  # a symlink leaving the root is never offered
        if _is_model_dir(resolved):
            yield child.relative_to(root).as_posix(), resolved
        elif depth < _MAX_DEPTH:
            yield from _walk(root, child, depth + 1)


def _check_name(name: str) -> None:
    if not name or not name.strip():
        raise ModelNotFound("model: give a model name", [])
    if "\\" in name or "\x00" in name:
        raise ModelNotFound(f"model: {name!r} is not a model name", [])
    pure = PurePosixPath(name)
    if pure.is_absolute() or name.startswith("~"):
        raise ModelNotFound(f"model: {name!r} is a path; give the name of a model under a model root", [])
    if ".." in pure.parts:
        raise ModelNotFound(f"model: {name!r} may not contain '..'", [])
    if pure.as_posix() != name:
        # One model, one name: "./tiny-llama" or "tiny-llama/" would be stored and shown as written.
        raise ModelNotFound(f"model: write {pure.as_posix()!r}, not {name!r}", [])


def resolve_model(name: str, settings: Settings | None = None) -> str:
    """The local directory of base model `name`, or the hub id itself when hub models are allowed."""
    settings = settings or get_settings()
    try:
        return _resolve(name, settings)
    except ModelNotFound as exc:
        available = [m.name for m in list_models(settings)]
        listed = ", ".join(available) if available else "none (set TUNEQ_MODEL_ROOTS)"
        raise ModelNotFound(f"{exc}; available models: {listed}", available) from None


def _resolve(name: str, settings: Settings) -> str:
    _check_name(name)
    escaped = False
    for root in settings.model_roots:
        root = Path(root).resolve()
        candidate = (root / name).resolve()
        if candidate == root:
            continue
        if not _inside(candidate, root):
            escaped = escaped or (root / name).exists() or (root / name).is_symlink()
            continue
        if _is_model_dir(candidate):
            return str(candidate)
    if escaped:
        # Not a hub id either: the name matches a local link someone planted.
        raise ModelNotFound(f"model: {name!r} leads outside its model root", [])
    if settings.allow_hub_models and _HUB_ID.match(name):
        return name
    raise ModelNotFound(f"model: unknown model {name!r}", [])
