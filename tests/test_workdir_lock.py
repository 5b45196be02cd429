"""One live run per workdir: a second run is refused, a stale lock is taken over, the lock goes
with its run."""

import json
import os
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
