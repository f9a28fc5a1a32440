"""The project's own error types: the problems a user can fix from the message alone.

Everything under `SparsellamaError` is a problem with what the user gave us (the
configuration, the data, a command-line argument or a model folder); its message names
the key, the file or the argument and says what is wrong. The CLI prints these as one
line. Any other exception is a bug (or an environment failure) and keeps its traceback.

The concrete types also subclass ValueError (RootBusy: RuntimeError) because that is
what callers caught before they existed: the HTTP server turns ValueError into a 400,
the runtime loader wraps a ValueError into a ModelLoadError, tests `pytest.raises(ValueError)`.
"""

from __future__ import annotations


class SparsellamaError(Exception):
    """Base of the errors a user can fix; the CLI reports them as one line."""


class ConfigError(SparsellamaError, ValueError):
    """A configuration problem, with a message that names the offending key."""


class DataError(SparsellamaError, ValueError):
    """A data problem that names the source (file, dataset, record) and what is wrong."""


class UserInputError(SparsellamaError, ValueError):
    """A bad command-line argument or request value, named in the message."""


class ModelLoadError(UserInputError):
    """A folder that cannot be loaded as a model; the message names the path and the cause."""


class MissingFileError(DataError, FileNotFoundError):
    """A file that an input folder should hold is absent (also a FileNotFoundError, as it was before)."""


class OutputWriteError(SparsellamaError, OSError):
    """An output that cannot be written (disk full, read-only folder); the message names the path.

    Also an OSError (with the original errno), as the failure it wraps was; its text is the message alone."""

    def __str__(self) -> str:
        return str(self.strerror)
