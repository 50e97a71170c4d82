"""The exceptions users see: the CLI prints them as plain lines (never a traceback) and exits with their code."""

from __future__ import annotations


class FtkitError(Exception):
    """A problem the user can fix (bad recipe, bad data, missing file): `ftkit: error: ...`, exit 2."""

    exit_code = 2
    label = "error"

    def __init__(self, *lines: str):
        self.lines = [line for line in lines if line]
        super().__init__("\n".join(self.lines))


class Interrupted(FtkitError):
    """Ctrl-C or SIGTERM stopped the command; the lines say what was kept and how to continue. Exit 130."""

    exit_code = 130
    label = "interrupted"


class BadRow(ValueError):
    """A data row that cannot become a training sample; the message says why (the data stage adds where)."""
