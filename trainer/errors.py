"""Failures the trainer reports as `error` events, each with a code the worker can map to a status."""

from __future__ import annotations


class TrainerError(Exception):
    """A failure with a message a user can act on; `code` is the error event's code."""

    code = "internal"

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class DataError(TrainerError):
    code = "data"


class ModelError(TrainerError):
    code = "model"


class ConfigError(TrainerError):
    code = "config"


class OutOfMemory(TrainerError):
    code = "oom"


class Stopped(BaseException):
    """Raised out of the loop by a signal; BaseException so that `except Exception` cannot eat it."""

    exit_code = 1


class Cancelled(Stopped):
    exit_code = 143  # 128 + SIGTERM, what a shell reports for a process killed by it


class Paused(Stopped):
    exit_code = 75  # EX_TEMPFAIL: "try again later", the checkpoint is saved
