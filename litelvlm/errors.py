"""Errors for bad input that the CLI reports as one clear line instead of a traceback."""


class LitelvlmError(ValueError):
    """A configuration, model or data input this framework cannot work with; the message names it."""


class DataError(LitelvlmError):
    """A data source, annotation or image that cannot be read as a referring-segmentation sample."""
