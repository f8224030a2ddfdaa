"""Shared set-up of the GPU tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _tiny_model_built_first(tiny_model_dir: Path) -> Path:
    """Liger's patches (trainer.fastpath.apply_liger) replace transformers' Llama RMSNorm, MLP and
    RoPE for the whole process, and the tiny model is built on the CPU, where those kernels do not
    run: built after a test that set up a fast path, it failed (2026-11-30, `-k "offload or sync"`).
    So it is built before any GPU test runs."""
    return tiny_model_dir
