"""The one exception type for problems a user can fix (bad data, bad config, missing files)."""

from __future__ import annotations


class SdiddError(Exception):
    """A user-facing problem; its message is one line naming the file and the problem.

    The CLI prints ``error: <message>`` and exits with status 2, so never put a traceback-worthy
    internal bug in here: those stay ordinary exceptions.
    """

    def __init__(self, message: str) -> None:
        # Keep the message on one line so `error: <msg>` stays one line in logs.
        super().__init__(" ".join(str(message).splitlines()))
