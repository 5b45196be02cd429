"""The one exception type for bad user input.

`launch.py` prints a `UserError` as a single line (no traceback) and exits with status 2. Raise it
wherever the fix is the user's: say what is wrong and how to fix it, in one sentence.
"""


class UserError(Exception):
    """Bad input from the user: a config value, a dataset, a file, a workdir."""
