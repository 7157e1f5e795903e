"""Errors a user can fix: the CLI prints them as one line (no traceback) and exits 2."""


class LlmtrainError(Exception):
    """Base of every error caused by the user's input: config, data, files, checkpoints."""


class ConfigError(LlmtrainError):
    """A config key, value or file is wrong."""


class DataError(LlmtrainError):
    """Input data is missing or malformed; the message names the file and line."""


class CheckpointError(LlmtrainError):
    """A checkpoint is missing, incomplete or does not fit the model."""


class DiskFullError(LlmtrainError):
    """The disk (or the user's quota) filled up while writing; the message names the file."""
