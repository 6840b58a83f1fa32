"""The one exception type that means "the user gave us something we cannot use".

The CLI turns it into a one-line message and a non-zero exit; anything else is a bug and keeps
its traceback.
"""


class PipelineError(Exception):
    """Bad input: unknown names, impossible values, missing files, incompatible caches."""

    def __init__(self, *args) -> None:
        # torch's DataLoader re-raises a worker's exception as its type built from one text, "Caught PipelineError
        # in DataLoader worker process N.\nOriginal Traceback ...\npipeline.errors.PipelineError: <message>": the
        # message (its last line) is the one line the CLI prints, as when the error is raised in this process
        name = type(self).__name__
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith(f"Caught {name} "):
            args = (args[0].rstrip().rsplit(f"{name}: ", 1)[-1],)
        super().__init__(*args)
