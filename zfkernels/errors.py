"""The one exception type that means "the user asked for something that cannot be done"."""

from __future__ import annotations


class UsageError(Exception):
    """A mistake in what the user asked for, or in their environment (a missing folder, weights
    of another architecture, no GPU). ``zfk`` prints it as ``zfk <command>: error: <message>``
    and exits with status 2, without a traceback; anything else escaping a command is a bug and
    keeps its traceback. Library code raises it only where it checks user-supplied input."""
