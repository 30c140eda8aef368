"""The one exception type for user errors: the CLI prints its message on one line, no traceback."""


class RidsError(Exception):
    """A problem with user input (paths, adapters, options) whose message names the fix."""
