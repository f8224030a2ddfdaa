"""core.model_roots: which directories count as base models, and names that must not escape a root."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.model_roots import ModelNotFound, list_models, resolve_model
from core.settings import Settings


def model(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Settings, Path, Path]:
    root = tmp_path / "models"
    outside = model(tmp_path / "secret-model")
    model(root / "tiny-llama")
    model(root / "meta-llama" / "Llama-3.2-1B")
    (root / "not-a-model").mkdir()
    (root / "escape").symlink_to(outside)
    (root / "alias").symlink_to(root / "tiny-llama")
    return Settings(model_roots=[root], _env_file=None), root, outside


def test_lists_directories_with_a_config(roots: tuple[Settings, Path, Path]) -> None:
    settings, root, _ = roots
    names = [m.name for m in list_models(settings)]
    assert names == ["alias", "meta-llama/Llama-3.2-1B", "tiny-llama"]


def test_resolves_names_to_directories_inside_the_root(roots: tuple[Settings, Path, Path]) -> None:
    settings, root, _ = roots
    assert resolve_model("tiny-llama", settings) == str((root / "tiny-llama").resolve())
    assert resolve_model("meta-llama/Llama-3.2-1B", settings) == str((root / "meta-llama" / "Llama-3.2-1B").resolve())
    assert resolve_model("alias", settings) == str((root / "tiny-llama").resolve())


@pytest.mark.parametrize(
    "name",
    ["../secret-model", "tiny-llama/../../secret-model", "escape", "/etc", "~/x", "..", ".", "", "not-a-model",
     "meta-llama", "a\\b"],
)
def test_refuses_names_that_are_not_models_inside_a_root(roots: tuple[Settings, Path, Path], name: str) -> None:
    settings, _, outside = roots
    with pytest.raises(ModelNotFound) as exc:
        resolve_model(name, settings)
    assert str(outside) not in str(exc.value)
    assert "tiny-llama" in exc.value.available


def test_absolute_path_to_a_real_model_is_refused(roots: tuple[Settings, Path, Path]) -> None:
    settings, root, _ = roots
    with pytest.raises(ModelNotFound, match="is a path"):
        resolve_model(str(root / "tiny-llama"), settings)


def test_hub_ids_only_when_allowed(roots: tuple[Settings, Path, Path]) -> None:
    settings, root, _ = roots
    with pytest.raises(ModelNotFound, match="available models: alias, meta-llama/Llama-3.2-1B, tiny-llama"):
        resolve_model("Qwen/Qwen2.5-0.5B", settings)
    hub = Settings(model_roots=[root], allow_hub_models=True, _env_file=None)
    assert resolve_model("Qwen/Qwen2.5-0.5B", hub) == "Qwen/Qwen2.5-0.5B"
    assert resolve_model("tiny-llama", hub) == str((root / "tiny-llama").resolve())
    for name in ("escape", "../secret-model", "/abs/path", "a/b/c"):
        with pytest.raises(ModelNotFound):
            resolve_model(name, hub)


@pytest.mark.parametrize(
    "name",
    [
        "https://huggingface.co/org/model", "file:///etc/passwd", "hf://org/model", "org/model?revision=x",
        "org/model#frag", "org@evil.com/model", "//evil.com/org/model", "org/../../../etc",
        "tiny-llama/../../secret-model", "%2e%2e/secret-model", "..%2fsecret-model", "tiny-llama\x00.txt",
        " org/model", "org/model ", "a/b/c", "-rf/model", ".hidden/model", "org/.git",
    ],
)
def test_url_tricks_are_neither_local_nor_hub_models(roots: tuple[Settings, Path, Path], name: str) -> None:
    settings, root, outside = roots
    hub = Settings(model_roots=[root], allow_hub_models=True, _env_file=None)
    for s in (settings, hub):
        with pytest.raises(ModelNotFound) as exc:
            resolve_model(name, s)
        assert str(outside) not in str(exc.value)


def test_symlinked_folder_out_of_a_root_is_refused_even_one_level_down(tmp_path: Path) -> None:
    root = tmp_path / "models"
    outside = model(tmp_path / "elsewhere" / "llama")
    (root / "org").mkdir(parents=True)
    (root / "org" / "llama").symlink_to(outside)
    (root / "linked-org").symlink_to(outside.parent)
    settings = Settings(model_roots=[root], _env_file=None)
    assert list_models(settings) == []
    for name in ("org/llama", "linked-org/llama"):
        with pytest.raises(ModelNotFound, match="outside its model root"):
            resolve_model(name, settings)
    # Even with hub ids allowed: the name matches a planted local link, so it is not sent to a hub.
    hub = Settings(model_roots=[root], allow_hub_models=True, _env_file=None)
    with pytest.raises(ModelNotFound):
        resolve_model("org/llama", hub)
