"""The one exception type users see: the CLI prints it as plain lines and exits with code 2."""

from __future__ import annotations


class FtkitError(Exception):
    """A problem the user can fix (bad recipe, bad data, missing file). Never shown as a traceback."""

    exit_code = 2

    def __init__(self, *lines: str):
        self.lines = [line for line in lines if line]
        super().__init__("\n".join(self.lines))
