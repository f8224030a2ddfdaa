"""Where the CLI finds its server and key: the environment first, then a TOML config file.

    # ~/.config/tuneq/config.toml  (or the file $TUNEQ_CONFIG names)
    url = "https://tuneq.example.com"
    api_key = "tq_..."

`TUNEQ_URL` and `TUNEQ_API_KEY` win over the file, so one shell can point elsewhere without
editing it. `tuneq config --url ... --api-key ...` writes the file (mode 0600: it holds a key).
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

KEYS = ("url", "api_key")


class ConfigError(Exception):
    """The config file exists but cannot be used; the message names the file and the problem."""


def config_path() -> Path:
    if os.environ.get("TUNEQ_CONFIG"):
        return Path(os.environ["TUNEQ_CONFIG"]).expanduser()
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "tuneq" / "config.toml"


def load() -> dict[str, str]:
    """The file's settings; {} when there is no file."""
    path = config_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    try:
        data: dict[str, Any] = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: not valid TOML ({exc})") from None
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ConfigError(f"config file {path}: unknown key {unknown[0]!r}; allowed: {', '.join(KEYS)}")
    for key, value in data.items():
        if not isinstance(value, str):
            raise ConfigError(f"config file {path}: {key} must be a string")
    return {k: v.strip() for k, v in data.items() if v.strip()}


def setting(name: str) -> tuple[str | None, str]:
    """(value, where it came from) of `url` or `api_key`: the environment, else the file."""
    env = f"TUNEQ_{name.upper()}"
    if os.environ.get(env, "").strip():
        return os.environ[env].strip(), f"${env}"
    value = load().get(name)
    return (value, str(config_path())) if value else (None, "")


def save(**values: str | None) -> Path:
    """Merge `values` (None: keep the file's) into the config file and write it, owner-only."""
    path = config_path()
    merged = {**load(), **{k: v for k, v in values.items() if v is not None}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        # A JSON string is a valid TOML basic string for everything a URL or key holds.
        f.writelines(f"{k} = {json.dumps(merged[k])}\n" for k in KEYS if merged.get(k))
    tmp.replace(path)
    return path
