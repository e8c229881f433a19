"""The user-facing error types: each message is one line that names the file, key or value and what was
expected. The CLI prints them as `medexp <command>: error: <message>` and exits with code 2, no traceback.

Programming errors (a bug in medexp, a library failing) are not among these: they keep their traceback.
"""

from __future__ import annotations


class MedexpError(Exception):
    """Base class of every user error medexp reports as one line."""


class ConfigError(MedexpError):
    """A bad configuration: unknown key or choice, a value out of range, a target outside the allowlist."""


class DataError(MedexpError):
    """A problem with the user's data or files: a missing folder, an unreadable case, a missing run."""


class ReportError(MedexpError):
    """`medexp report` cannot be made: unknown experiment or sweep, no finished runs."""


USER_ERRORS = (MedexpError,)
