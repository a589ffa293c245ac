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


class MissingDependencyError(SdloraError):
    """An optional package is needed for the requested feature."""
