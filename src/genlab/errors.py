"""Typed errors. Every error a user can cause is a GenlabError with one clear line of text;
the CLI prints it and exits with code 2."""


class GenlabError(Exception):
    """Base class for errors caused by bad input (not bugs)."""


class ModelLoadError(GenlabError):
    """A model folder is missing, incomplete or corrupt."""


class UnsupportedArchitectureError(ModelLoadError):
    """The folder holds an architecture neither genlab nor transformers can run."""


class InvalidParameterError(GenlabError, ValueError):
    """A parameter is out of its valid range (e.g. top_p outside (0, 1])."""


class ContextLengthError(GenlabError, ValueError):
    """A prompt does not fit the model's context window."""


class DataError(GenlabError):
    """Input data is unreadable or malformed; the message names the file and line."""
