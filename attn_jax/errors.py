"""attn_jax's one-line errors, and how faults of the machine become one.

`UserError` is bad input: a config value, a dataset, a file, a workdir; raise it wherever the fix is
the user's, saying what is wrong and how to fix it in one sentence. `RunFault` is a fault of a run or
of the machine under it: a damaged file of a saved run, a full disk, a folder removed mid-run. Both
are what the Python API raises (`one_line`) and what `launch.py` prints as its single line (no
traceback), exiting with the error's `exit_status`: 2 for input, 1 for a fault.
"""


import errno
import functools
import json
import os
import re
import resource


class UserError(Exception):
    """Bad input from the user: a config value, a dataset, a file, a workdir. The base of every
    attn_jax error that is one line for the user."""

    exit_status = 2


class RunFault(UserError):
    """A fault of a run or of the machine rather than of the input: a file of a saved run that
    cannot be read, a full disk, a folder removed under a running training."""

    exit_status = 1


# tensorstore (orbax's storage) reports file-system faults as a status in a ValueError's message,
# which names the OS error where there is one ('RESOURCE_EXHAUSTED: ... local file "DIR": Failed to
# open directory: "DIR/...": Too many open files'); without one, the status says which fault.
_TENSORSTORE_FAULTS = {"RESOURCE_EXHAUSTED": (errno.ENOSPC, "No space left on device"),
                       "PERMISSION_DENIED": (errno.EACCES, "Permission denied"),
                       "NOT_FOUND": (errno.ENOENT, "No such file or directory")}
_OS_FAULTS = (errno.EMFILE, errno.ENFILE, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
              errno.ENOENT)


def _tensorstore_fault(message: str) -> OSError | None:
    """The file-system fault a tensorstore status message reports, as an OSError, or None."""
    status = re.match(r"(\w+): .*?file \"([^\"]+)\"", message)
    if not status or status.group(1) not in _TENSORSTORE_FAULTS:
        return None
    code = next((c for c in _OS_FAULTS if os.strerror(c) in message), None)
    if code is not None:
        return OSError(code, os.strerror(code), status.group(2))
    return OSError(*_TENSORSTORE_FAULTS[status.group(1)], status.group(2))


def environment_error(error: BaseException) -> OSError | None:
    """The file-system fault behind `error` as an OSError (itself, or in its chain of causes: orbax
    and tensorstore wrap them), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        if (fault := _tensorstore_fault(str(error))) is not None:
            return fault
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


RELAUNCH = "fix this, then relaunch the same command"


def describe_environment_error(error: OSError, advice: str = RELAUNCH) -> str:
    """One line for a fault of the machine rather than of the input (a full disk, a folder deleted
    or made read-only under a run, too many open files): the path, the cause, and `advice`, what is
    kept and how to go on (for a training run, `run_guard.relaunch_advice` says it from its
    workdir)."""
    if error.errno in (errno.EMFILE, errno.ENFILE):
        return f"{_open_files(error.errno)}. {advice[0].upper()}{advice[1:]}"
    where = error.filename or "a file of the run"
    cause = error.strerror or str(error) or type(error).__name__
    return f"{where}: {cause}. {advice[0].upper()}{advice[1:]}"


def _open_files(code: int) -> str:
    """The cause and the fix of running out of file descriptors: this process's limit (EMFILE), or
    the machine's (ENFILE)."""
    if code == errno.ENFILE:
        return ("too many open files on this machine (its table of open files is full): close "
                "other programs, or raise the limit with `sysctl fs.file-max`")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= soft:
        fix = (f"raise the hard limit (`ulimit -Hn`, here {hard}) as root or in "
               "/etc/security/limits.conf, then `ulimit -n` before launching")
    else:
        most = "unlimited" if hard == resource.RLIM_INFINITY else hard
        fix = f"raise it with `ulimit -n` before launching (up to {most}, the hard limit)"
    return f"too many open files: this process may open {soft} (`ulimit -n`); {fix}"


def reason(error: BaseException) -> str:
    """Why a file could not be read, in a few words: the innermost error of the chain, its first
    line; of tensorstore's messages (a status, the contexts it was met in, a JSON spec) the status
    and the last context."""
    while error.__cause__ is not None:
        error = error.__cause__
    if isinstance(error, UnicodeDecodeError):
        return f"not text: byte {error.object[error.start]:#04x} at position {error.start}"
    if isinstance(error, json.JSONDecodeError):
        return f"not valid JSON: {error}"
    text = (str(error).strip().splitlines() or [""])[0].split(" [tensorstore_spec=")[0]
    if isinstance(error, ValueError) and (status := re.match(r"([A-Z_]+): .*: (.+)$", text)):
        return f"{status.group(1)}: {status.group(2)}"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def one_line(function=None, *, advice=None):
    """`function`, a public entry point, raising only attn_jax's own errors for what has one line:
    a `UserError` as it is, a file-system fault (`environment_error`) as a `RunFault` carrying the
    line `launch.py` prints for it, caused by the original; `advice(*args, **kwargs)`, given the
    call's arguments, says in it what is kept and how to go on (default `RELAUNCH`). Any other error
    (a bug) propagates as it is, its traceback being the report. `@one_line` or
    `@one_line(advice=...)`."""
    if function is None:
        return functools.partial(one_line, advice=advice)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except UserError:
            raise
        except Exception as e:
            if (cause := environment_error(e)) is None:
                raise
            said = RELAUNCH if advice is None else advice(*args, **kwargs)
            raise RunFault(describe_environment_error(cause, said)) from e
    return wrapper
