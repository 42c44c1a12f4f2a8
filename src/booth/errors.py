"""User-facing errors.

A `BoothError` is a problem with the user's input or environment (missing file, bad option, no network).
The CLI prints its message on one line and exits non-zero; the server turns it into an A1111-style JSON error.
Anything else that escapes is a bug.
"""


class BoothError(Exception):
    """An error whose message is meant for the user, printed without a traceback."""

    exit_code = 2


class NetworkRequiredError(BoothError):
    """Something can only come from a model hub and the hub cannot be reached."""
