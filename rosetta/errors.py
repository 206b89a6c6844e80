"""Errors a user can cause. The CLI prints their message as one line, without a traceback."""


class RosettaError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class InputError(RosettaError):
    """One input (a file, bytes, a string) could not be used; the message names it and the reason."""


class ModelNotFoundError(RosettaError):
    """A model name or path that is neither a preset, a local model directory, nor a reachable hub repo."""
