"""The one exception type a user sees as a single line (the CLI prints it and exits 1)."""


class PocketError(Exception):
    """A problem with the user's input or environment, explained in one sentence."""
