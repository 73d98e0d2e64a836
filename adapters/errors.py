"""Adapter errors a user can act on. Each carries the HTTP status the API edge maps it to.

The engine and the adapter code never speak HTTP; they only pick the class. The API layer turns
`AdapterError.status` + `str(error)` into the JSON error body.
"""

from __future__ import annotations


class AdapterError(Exception):
    """Base class: a problem with an adapter or an adapter request. `field` names the offending field."""

    status: int = 400

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class AdapterValidationError(AdapterError):
    """The adapter's files are malformed or do not fit the base model (400)."""

    status = 400


class AdapterNotFoundError(AdapterError):
    """Unknown adapter name, or a path that does not exist (404)."""

    status = 404


class AdapterForbiddenError(AdapterError):
    """A path outside the adapter root, directly or through a symlink (403)."""

    status = 403


class AdapterConflictError(AdapterError):
    """The adapter name is already registered (409)."""

    status = 409


class AdapterTooLargeError(AdapterError):
    """An upload or a file larger than the configured limit (413)."""

    status = 413


class AdapterBadNameError(AdapterError):
    """A name outside `[A-Za-z0-9._-]{1,128}` or one of `.` / `..` (422)."""

    status = 422


class AdapterCommandError(AdapterError):
    """The engine raised while applying an admin command (pin, forget, seed the host tier): 500, naming it."""

    status = 500


class AdapterCommandTimeout(AdapterError):
    """The engine did not apply an admin command in time, or stopped first: 503, naming it."""

    status = 503
