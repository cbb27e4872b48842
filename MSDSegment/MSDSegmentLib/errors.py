"""Errors the engine reports to users: each carries a one-line, human-readable message."""


class MSDSegmentError(Exception):
    """A problem with the input, the model files or the environment, explained in one line."""


class InputError(MSDSegmentError):
    """The input image cannot be segmented (unreadable, wrong shape, invalid values...)."""


class ModelError(MSDSegmentError):
    """A model file or model card is missing, corrupted or inconsistent."""


class Cancelled(MSDSegmentError):
    """The caller asked to stop; nothing was written."""

    def __init__(self, message="Segmentation cancelled."):
        super().__init__(message)


def describe_error(error):
    """The one line shown to a user for an engine error or an unexpected one (any exception)."""
    if isinstance(error, MSDSegmentError):
        return str(error)
    if isinstance(error, MemoryError):
        return "Out of memory" + (f": {error}" if str(error) else "")
    return f"Unexpected error: {type(error).__name__}: {error}"
