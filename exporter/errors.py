"""The one error type users see: a single line saying what went wrong and where."""


class ExportError(Exception):
    """A user-facing failure. The CLI prints ``error: <message>`` and exits 1."""
