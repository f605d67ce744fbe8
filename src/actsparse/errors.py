"""The one exception type the library raises for bad input; the CLI turns it into one line on stderr."""


class ActSparseError(Exception):
    """A user-facing error: bad input, a missing file, an unsupported model."""
