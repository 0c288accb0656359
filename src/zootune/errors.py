"""User-facing errors.

Every problem caused by the user's input (a missing or corrupt file, a mismatched zoo, an empty
dataset, labels out of range, a non-finite loss, ...) is raised as a :class:`ZootuneError` with a
message that says what is wrong and, where possible, what to do. The CLI prints such an error as one
line on stderr and exits non-zero; any other exception is a bug in zootune.
"""


class ZootuneError(Exception):
    """An error caused by the user's input or environment, reported without a traceback."""


class CheckpointError(ZootuneError):
    """A checkpoint file is missing, truncated, unsafe to unpickle or of the wrong layout."""


class ZooMismatchError(ZootuneError):
    """The members of a zoo do not share one architecture."""


class DataError(ZootuneError):
    """A dataset is empty, malformed, unreadable or has labels out of range."""


class NonFiniteLossError(ZootuneError):
    """Training produced a NaN or infinite loss (or weights).

    ``checkpoint``: the last good checkpoint that was kept, or None when none had been written yet;
    ``cause``: what happened, without advice; ``str()`` adds advice for Python callers (the CLI words
    its own, with its flags).
    """

    def __init__(self, cause: str, *, checkpoint=None, advice: str = ""):
        super().__init__(f"{cause}; {advice}" if advice else cause)
        self.cause = cause
        self.checkpoint = checkpoint


class UntrustedCodeError(ZootuneError):
    """A file or option names code to import (``module:function``) and code was not trusted.

    Loading a checkpoint, a model folder or a config never runs code from it: only registered names
    (architectures, methods) are looked up. Importing a named builder needs ``trust_code=True``
    (``--trust-code`` on the command line).
    """


class OptionError(ZootuneError):
    """An option has an unknown name, a value of the wrong type, or a value out of range."""
