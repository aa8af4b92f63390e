"""The one exception type users see: a clear message, never a stack trace from the CLI."""


class OpenGLMError(Exception):
    """A user-facing error (bad path, unknown name, mismatched weights...)."""
