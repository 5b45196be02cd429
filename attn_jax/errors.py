"""The one exception type for bad user input.

`launch.py` prints a `UserError` as a single line (no traceback) and exits with status 2. Raise it
wherever the fix is the user's: say what is wrong and how to fix it, in one sentence.
"""


import errno
import re


class UserError(Exception):
    """Bad input from the user: a config value, a dataset, a file, a workdir."""


# tensorstore (orbax's storage) reports file-system faults as a status in a ValueError's message.
_TENSORSTORE_FAULTS = {"RESOURCE_EXHAUSTED": (errno.ENOSPC, "No space left on device"),
                       "PERMISSION_DENIED": (errno.EACCES, "Permission denied"),
                       "NOT_FOUND": (errno.ENOENT, "No such file or directory")}


def environment_error(error: BaseException) -> OSError | None:
    """The file-system fault behind `error` as an OSError (itself, or in its chain of causes: orbax
    and tensorstore wrap them), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        status = re.match(r"(\w+): .*?file \"([^\"]+)\"", str(error))
        if status and status.group(1) in _TENSORSTORE_FAULTS:
            return OSError(*_TENSORSTORE_FAULTS[status.group(1)], status.group(2))
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


RELAUNCH = "fix this, then relaunch the same command"


def describe_environment_error(error: OSError, advice: str = RELAUNCH) -> str:
    """One line for a fault of the machine rather than of the input (a full disk, a folder deleted
    or made read-only under a run): the path, the cause, and `advice`, what is kept and how to go
    on (for a training run, `run_guard.relaunch_advice` says it from its workdir)."""
    where = error.filename or "a file of the run"
    cause = error.strerror or str(error) or type(error).__name__
    return f"{where}: {cause}. {advice[0].upper()}{advice[1:]}"
