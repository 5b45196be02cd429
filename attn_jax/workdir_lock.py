"""One live run per workdir: `DIR/run.lock` names the process that trains there.

The lock is a file holding the host, process id and a heartbeat that a background thread renews
every `HEARTBEAT_S` seconds. It is created whole or not at all (`atomic.create_text`: a temporary
file hard-linked to the lock's name, which fails if the name exists) and renewed by an atomic
rename, so a full disk or a kill never leaves it empty or half-written. A second run in the same
workdir is refused while the lock is live. A stale lock is taken over, with a line saying so: its
process is gone (same host), its heartbeat is older than `STALE_AFTER_S` (another host: workdirs
live on network filesystems shared by several machines), or it cannot be read (empty or damaged:
no live run wrote it). In a multi-process job only process 0 holds the lock, for the whole job.
"""

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import jax

from attn_jax import atomic
from attn_jax.errors import UserError

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
LOCK_NAME = "run.lock"


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _stale_reason(holder: dict) -> str | None:
    """Why the lock of `holder` ({}: unreadable) may be taken over, or None while it is live."""
    if not holder:
        return "it is empty or damaged, so no live run holds it"
    age = time.time() - float(holder.get("heartbeat", 0))
    if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
        return f"its process {holder.get('pid')} on this host is gone"
    if age > STALE_AFTER_S:
        return f"its heartbeat is {age:.0f} s old"
    return None


def _read(path: Path) -> dict | None:
    """The owner recorded in the lock at `path`; {} when it cannot be read (left empty or damaged
    by an older attn_jax that wrote it in place, or edited); None when there is no lock."""
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


class InUse(UserError):
    """The workdir is held by another live run."""


def live_holder(workdir: Path) -> dict | None:
    """The owner (host, pid, heartbeat) of the workdir's live lock, or None: no lock, or a stale
    one (its process gone, its heartbeat too old, its content unreadable)."""
    holder = _read(workdir / LOCK_NAME)
    return holder if holder is not None and _stale_reason(holder) is None else None


def acquire(workdir: Path) -> Path:
    """Creates `workdir/run.lock` for this process, taking over a stale one; returns its path."""
    path = workdir / LOCK_NAME
    for _ in range(3):  # a takeover races with at most a few others
        try:
            atomic.create_text(path, json.dumps(_owner()))
            return path
        except FileExistsError:
            if (holder := _read(path)) is None:
                continue  # released meanwhile
            reason = _stale_reason(holder)
            if reason is None:
                age = time.time() - float(holder.get("heartbeat", 0))
                raise InUse(
                    f"{workdir} is in use by process {holder.get('pid', '?')} on "
                    f"{holder.get('host', '?')} (heartbeat {age:.0f} s ago): wait for that run "
                    f"to end, or use another --workdir") from None
            owner = f" of process {holder.get('pid')} on {holder.get('host')}" if holder else ""
            print(f"warning: taking over the stale lock {path}{owner} ({reason})", flush=True)
            path.unlink(missing_ok=True)
    raise UserError(f"could not take the lock {path}: other runs keep taking it; use another --workdir")


@contextlib.contextmanager
def hold(workdir: Path) -> Iterator[None]:
    """Holds the workdir's lock (process 0 of a job) for the block, renewing its heartbeat."""
    if jax.process_index() != 0:
        yield
        return
    created = [p for p in (workdir, *workdir.parents) if not p.exists()]  # the deepest first
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        path = acquire(workdir)
    except BaseException:  # refused, or a full disk: leave no folder this launch made
        _remove_empty(created)
        raise
    stop = threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):  # a full disk must not kill the run here
                atomic.write_text(path, json.dumps(_owner()))

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        path.unlink(missing_ok=True)
        _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    """Removes `folders` (the deepest first) while they are empty: a launch that wrote nothing
    leaves no empty workdir, nor the folders made on its way."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty: something was written there
            return
