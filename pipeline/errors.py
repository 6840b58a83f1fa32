"""The one exception type that means "the user gave us something we cannot use".

The CLI turns it into a one-line message and a non-zero exit; anything else is a bug and keeps
its traceback.
"""


class PipelineError(Exception):
    """Bad input: unknown names, impossible values, missing files, incompatible caches."""
