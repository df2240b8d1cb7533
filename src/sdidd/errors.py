"""The one exception type for problems a user can fix (bad data, bad config, missing files)."""

from __future__ import annotations

import reprlib
from typing import Any

MAX_MESSAGE = 1000  # characters: a hostile value must not make a 200 MB error line

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxlevel = 3


def shown(value: Any) -> str:
    """A value as an error message shows it: repr, shortened (long strings, deep or long lists end in '...')."""
    return _REPR.repr(value)


class SdiddError(Exception):
    """A user-facing problem; its message is one line naming the file and the problem.

    The CLI prints ``error: <message>`` and exits with status 2, so never put a traceback-worthy
    internal bug in here: those stay ordinary exceptions.
    """

    def __init__(self, message: str) -> None:
        # Keep the message on one line so `error: <msg>` stays one line in logs.
        line = " ".join(str(message).splitlines())
        super().__init__(line if len(line) <= MAX_MESSAGE else line[:MAX_MESSAGE - 3] + "...")


def is_out_of_memory(e: BaseException) -> bool:
    """Whether `e` is the machine running out of memory (Python's MemoryError, or torch's CPU or CUDA allocator)."""
    if isinstance(e, MemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                            or "cannot allocate memory" in text)
