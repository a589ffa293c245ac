"""Typed errors. The library raises these; the CLI and web UI turn them into one-line messages."""


class SdloraError(Exception):
    """Base class: a problem the user can fix, with a message that says how."""


class ConfigError(SdloraError):
    """An option or config file value is wrong."""


class DataError(SdloraError):
    """The training data folder cannot be used."""


class ModelError(SdloraError):
    """A base model cannot be found, loaded or recognised."""


class FormatError(SdloraError):
    """A LoRA or state file is malformed, unsafe or does not fit the base."""


class TrainingError(SdloraError):
    """A run cannot go on (a loss that is no longer finite); the message says what was kept."""


class Interrupted(Exception):
    """A run stopped by a signal after saving; the CLI exits with 128 + the signal's number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class MissingDependencyError(SdloraError):
    """An optional package is needed for the requested feature."""
