"""Errors that tell the user what went wrong and what to do next.

Every error raised on purpose by imgtune is an :class:`ImgtuneError`; the CLI maps each subclass to
a documented exit code (see ``EXIT_CODES`` and the README). Anything else is a bug and exits with 1.
"""

from __future__ import annotations


class ImgtuneError(Exception):
    """Base class; ``exit_code`` is what the command line returns for it."""

    exit_code = 1


class UsageError(ImgtuneError):
    """A bad flag, option value or configuration file."""

    exit_code = 2


class DataError(ImgtuneError):
    """The data cannot be used: missing folder, empty or missing class, unreadable CSV, ..."""

    exit_code = 3


class ModelError(ImgtuneError):
    """The model or its weights cannot be found, built or loaded."""

    exit_code = 4


class TrainingDiverged(ImgtuneError):
    """Training stopped because a loss or the weights stopped being finite numbers (NaN or infinite);
    the checkpoints written before it are kept, and no weights are saved."""

    exit_code = 5


class FederationError(ImgtuneError):
    """A federation did not finish: a Flower party stopped, too few sites answered, or the run failed;
    the message names the party and the log that says why."""

    exit_code = 6


class Interrupted(ImgtuneError):
    """Training stopped by SIGINT or SIGTERM after writing a checkpoint; the exit code is the shell's
    convention for a signal: 128 + its number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_CODES = {
    "success": EXIT_OK,
    "unexpected failure": EXIT_UNEXPECTED,
    "usage or configuration error": UsageError.exit_code,
    "data error": DataError.exit_code,
    "model or weights error": ModelError.exit_code,
    "training diverged (a loss or the weights became NaN or infinite; the checkpoints before it are kept)":
        TrainingDiverged.exit_code,
    "federation did not finish (imgtune federate; the message names the party and its log)": FederationError.exit_code,
    "training stopped by SIGINT (after a checkpoint)": 130,
    "training stopped by SIGTERM (after a checkpoint)": 143,
}
