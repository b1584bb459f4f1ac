"""align: RLHF and preference alignment with humans in the loop. The library the recipes share."""

__version__ = "0.1.0"


class StageError(RuntimeError):
    """A stage refusing to go on, with a message that says why and what to do about it."""
