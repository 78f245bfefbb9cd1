"""Typed errors. Library code raises these; only the CLI turns them into exit codes."""


class RowcolError(Exception):
    """Base class: a problem with the user's input that the message names."""


class ConfigError(RowcolError, ValueError):
    """A bad config key, value or flag."""


class DataError(RowcolError):
    """A missing, empty or unreadable dataset."""


class BadImageError(DataError):
    """One image file that cannot be decoded; ``path`` names it."""

    def __init__(self, path, reason: str = '') -> None:
        # one-argument form too: DataLoader re-raises a worker's error as ``type(message)``
        self.path = str(path)
        self.reason = reason
        super().__init__(f'{self.path}: {reason}' if reason else self.path)


class ModelNameError(RowcolError, KeyError):
    """An unknown model name."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ''


class CheckpointError(RowcolError):
    """A checkpoint or run directory that is missing, corrupt, or does not fit the model/classes."""


class RunExistsError(RowcolError):
    """--output points at an existing run and neither --resume nor --overwrite was given."""


class RunLockedError(RowcolError):
    """Another process holds the run directory's lock (it is training into it)."""


class NonFiniteLossError(RowcolError):
    """Too many non-finite losses in a row; the last good checkpoint is left intact."""


class Interrupted(RowcolError):
    """SIGTERM or Ctrl-C: a resumable checkpoint was written."""

    def __init__(self, message: str, signum: int) -> None:
        self.signum = signum
        super().__init__(message)
