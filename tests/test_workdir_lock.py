"""One live run per workdir: a second run is refused, a stale lock is taken over, the lock goes
with its run."""

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

from attn_jax import workdir_lock
from attn_jax.errors import UserError


def test_a_second_run_in_a_live_workdir_is_refused(tmp_path):
    with workdir_lock.hold(tmp_path):
        holder = json.loads((tmp_path / "run.lock").read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(UserError, match=rf"{tmp_path} is in use by process {os.getpid()} on "
                                            r".*: wait for that run to end, or use another --workdir"):
            workdir_lock.acquire(tmp_path)
    assert not (tmp_path / "run.lock").exists()  # released with its run


@pytest.mark.slow
def test_a_stale_lock_is_taken_over_with_a_line(tmp_path, capsys):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    lock = tmp_path / "run.lock"
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": int(gone),
                                "heartbeat": time.time()}))
    workdir_lock.acquire(tmp_path)
    assert f"process {gone} on this host is gone" in capsys.readouterr().out
    assert json.loads(lock.read_text())["pid"] == os.getpid()

    lock.write_text(json.dumps({"host": "another-machine", "pid": 1,
                                "heartbeat": time.time() - 2 * workdir_lock.STALE_AFTER_S}))
    workdir_lock.acquire(tmp_path)
    assert "its heartbeat is" in capsys.readouterr().out
    lock.write_text(json.dumps({"host": "another-machine", "pid": 1, "heartbeat": time.time()}))
    with pytest.raises(UserError, match="in use by process 1 on another-machine"):
        workdir_lock.acquire(tmp_path)  # a live run on another machine


def test_a_failed_start_leaves_no_empty_workdir(tmp_path):
    workdir = tmp_path / "new" / "runs" / "a"
    with pytest.raises(RuntimeError), workdir_lock.hold(workdir):
        raise RuntimeError("e.g. a dataset that is not prepared")
    assert list(tmp_path.iterdir()) == []  # nor the folders made on its way
    with pytest.raises(RuntimeError), workdir_lock.hold(workdir):
        (tmp_path / "new" / "kept").write_text("")  # written meanwhile, beside the workdir
        raise RuntimeError("e.g. a dataset that is not prepared")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["kept"]


@contextlib.contextmanager
def _full_disk():
    """Within the block, writing a byte to any file fails (EFBIG, as a full disk fails with ENOSPC):
    a file-size limit of 0, its signal ignored."""
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)


def test_a_lock_that_cannot_be_written_is_not_left_behind(tmp_path):
    """A launch on a full disk fails naming the lock, leaves neither a lock nor the workdir it
    created, and the same launch succeeds at once when there is space."""
    workdir = tmp_path / "new"
    with _full_disk(), pytest.raises(OSError) as raised, workdir_lock.hold(workdir):
        pass
    assert raised.value.filename == str(workdir / "run.lock")
    assert not workdir.exists()
    with workdir_lock.hold(workdir):
        assert json.loads((workdir / "run.lock").read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("content", ["", '{"host": "vm", "pi', "[]"])
def test_an_unreadable_lock_is_taken_over_with_a_line(tmp_path, capsys, content):
    """An empty or damaged lock (attn_jax writes it whole, so no live run left it so) names no live
    run: it is taken over at once, not refused as in use."""
    (tmp_path / "run.lock").write_text(content)
    assert workdir_lock.live_holder(tmp_path) is None
    workdir_lock.acquire(tmp_path)
    assert capsys.readouterr().out == (
        f"warning: taking over the stale lock {tmp_path / 'run.lock'} (it is empty or damaged, so "
        "no live run holds it)\n")
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
