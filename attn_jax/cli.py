"""launch.py's command line as the user sees it fail: one `error: ...` line on stderr, an exit status.

Status 2 is a fault of the input (a flag, the experiment file, a config value, a workdir: anything
raised as a `UserError`), status 1 one of the run or the machine (a diverged loss, a full disk, a
damaged checkpoint: a `RunFault`). A sweep point launched on its own (`--sweep --point`) also
records its line in its directory, where `--collect` lists it.
"""

import os
import re
import signal
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

from absl import flags

from attn_jax.errors import UserError, describe_environment_error, environment_error


def fail(message: str, status: int = 2, point=None) -> NoReturn:
    """Prints one error line and exits with `status`, recording the line in `point` (a sweep.Point)."""
    if point is not None:
        point.record_failure(message)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def exit_on_known_error(error: Exception, point=None, run_workdir: str | Path | None = None) -> None:
    """Exits with one line for a `UserError` (its `exit_status`: 2 for bad input, 1 for a
    `RunFault`) or a file-system fault under the run (a full disk, a deleted or read-only folder:
    status 1), which says what is kept: for a training run (`run_workdir`), its newest checkpoint or
    none. Any other error is recorded in `point` and returns: the caller re-raises it, its traceback
    being the report."""
    from attn_jax.workdir_lock import InUse

    if isinstance(error, UserError):
        line, status = str(error), error.exit_status
    elif (cause := environment_error(error)) is not None:
        line, status = describe_environment_error(cause), 1
        if run_workdir is not None:
            from attn_jax.run_guard import relaunch_advice

            line = describe_environment_error(cause, relaunch_advice(Path(run_workdir)))
    else:
        if point is not None:
            point.record_failure(f"{type(error).__name__}: "
                                 f"{(str(error).strip().splitlines() or [''])[-1]}")
        return
    if status != 1:  # a refused launch (InUse) is no failure of the point
        fail(line, status, point=None if isinstance(error, InUse) else point)
    if point is not None:
        point.record_failure(line)
    print(f"error: {line}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)  # skip the teardown of orbax's failed writer threads, which prints tracebacks


def exit_on_signals(mode: str) -> None:
    """A SIGTERM or SIGINT stops --mode=`mode` (eval, attend, summary, benchmark, ...) at once, with
    one line and status 128 + the signal, as a kill would: its outputs are written whole (atomic
    renames), at its end, but for attend's images, one by one, so nothing half-written is left; an
    import records its run last, so the same command redoes one stopped before that
    (`modes.import_weights`). It exits without unwinding: an exception raised from the handler
    could land in a callback of JAX or orbax, which would print it and carry on."""
    written = {"attend": "stopped; each image it wrote is whole; nothing else changed",
               "import": "stopped: relaunch the same command, which finishes the import or "
                         "finds it finished"}.get(mode, "stopped before its results were written; "
                                                    "nothing else changed")

    def stop(signum, frame) -> None:
        del frame
        sys.stdout.flush()
        print(f"received {signal.Signals(signum).name} during --mode={mode}: {written}",
              file=sys.stderr, flush=True)
        os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing whose errors (a misspelled --config key among them) are one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e).strip().splitlines()[0])
    except OSError as e:  # the config file, when config_flags loads it while parsing
        fail(describe_config_file_error(e))
    except SyntaxError as e:
        fail(f"--config: the experiment file {e.filename} has a syntax error at line {e.lineno}: "
             f"{e.msg}")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        fail(_describe_override_error(argv, e))


def describe_config_file_error(error: OSError) -> str:
    """The line for an experiment file config_flags could not load."""
    missing = re.search(r"Attempted.*?:\s*(\S+)\s*\[Errno 2\]", str(error), re.S)
    if missing:
        return f"--config: no such experiment file {missing.group(1)!r}"
    return f"--config: cannot load the experiment file ({str(error).splitlines()[0]})"


def _describe_override_error(argv: list[str], error: Exception) -> str:
    text = str(error).replace("\\n", " ").replace("\\'", "'").strip("'\" ")
    suggestion = re.search(r'Did you mean "([\w.]+)"', text)
    overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    flag = next((o for o in overrides if o.split(".")[-1] in text), None)
    if flag and suggestion:
        return f"{flag}: no such config key (did you mean {suggestion.group(1)!r}?)"
    if flag:
        return f"{flag}: no such config key or a bad value ({text})"
    return f"bad --config: {text}"


def workdir_error(workdir: str | None, what: str, *, holds: str | None = None,
                  writes: bool = True) -> str | None:
    """The line refusing `--workdir` for `what` (the mode, e.g. "--mode=eval"), or None: it is
    required; with `holds` (what it must hold, e.g. "the workdir of a trained run") it must exist;
    with `writes`, be a directory this process can write in, or create."""
    if not workdir:
        return f"--workdir is required for {what}"
    path = Path(workdir)
    if holds is not None and not os.path.lexists(path):
        return f"--workdir={path} does not exist: {what} needs {holds}"
    if holds is not None and not path.is_dir():
        return f"--workdir={path} is not a directory: {what} needs {holds}"
    return unwritable(path, "--workdir") if writes else None


def unwritable(path: Path, flag: str) -> str | None:
    """The line refusing `flag`=`path`, a directory to write in (made if missing), or None: the
    nearest folder on its way that exists must be a directory this process can write in."""
    existing = next(p for p in (path, *path.parents) if os.path.lexists(p))
    if not existing.is_dir():
        where = "" if existing == path else f": {existing}"
        kind = "a file, not a directory" if existing.is_file() else "not a directory"
        return f"{flag}={path}{where} is {kind}: choose another {flag}"
    if (cause := cannot_write_in(existing)) is not None:
        made = "is not writable" if existing == path else "cannot be created"
        return f"{flag}={path} {made}: writing in {existing} fails ({cause}): choose another {flag}"
    return None


def cannot_write_in(folder: Path) -> str | None:
    """Why this process cannot create entries in the directory `folder`, or None. Tried (a folder
    made and removed at once), not deduced from permission bits, which root passes while /proc,
    read-only mounts and ACLs still refuse."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".attn_jax_write_test_", dir=folder))
    except OSError as e:
        return e.strerror or type(e).__name__
    return None
