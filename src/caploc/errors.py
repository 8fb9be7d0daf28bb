"""One exception type for every user-facing failure: the CLI prints its message as one line."""


class CaplocError(Exception):
    """A problem with the user's input or environment (bad model spec, bad head, empty dataset...)."""
