"""attn_jax/distributed.py: two processes on loopback train like one process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, SMALL_RUN, small_digits_config

from attn_jax import train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, digits_data_dir):
    """(train losses, validation record) of the small run in one process on 8 devices, its split on
    the devices: the training order depends neither on the process count nor on the feed (a
    streamed run resumes a resident one bitwise: test_checkpoint.py), so both cases compare to it."""
    workdir = tmp_path_factory.mktemp("one_process")
    train.train_and_evaluate(small_digits_config(digits_data_dir), str(workdir))
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in records if "train/loss" in r], next(
        r for r in records if "val/loss" in r)


@pytest.mark.slow
@pytest.mark.parametrize("resident_limit_mib", [None, 0], ids=["resident", "streamed"])
def test_two_processes_match_one(tmp_path, digits_data_dir, one_process, resident_limit_mib):
    """Each process holds the split (resident) or reads its rows of every global batch (streamed)."""
    overrides = {**SMALL_RUN, "dataset.resident_limit_mib": resident_limit_mib}
    flags = [f"--config.{k}={v}" for k, v in overrides.items() if v is not None]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    env.pop("JAX_COMPILATION_CACHE_DIR")  # two processes sharing conftest's cache aborted (SIGABRT)
    port = _free_port()
    processes = [subprocess.Popen(
        [sys.executable, "launch.py", "--config=experiments/patch_convnet.py:smoke",
         f"--workdir={tmp_path / 'run'}", f"--config.dataset.data_dir={digits_data_dir}", *flags,
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in (0, 1)]
    outputs = [p.communicate(timeout=900) for p in processes]
    for p, (_, err) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, err[-2000:]
    assert "8 device(s)" in outputs[0][0]
    assert ("on the devices" if resident_limit_mib is None else "streamed") in outputs[0][0]
    assert "epoch 1/1" in outputs[0][0] and "epoch" not in outputs[1][0]  # only process 0 logs

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    two_losses = [r["train/loss"] for r in records if "train/loss" in r]
    val = next(r for r in records if "val/loss" in r)
    one_losses, one_val = one_process
    assert len(two_losses) == 10  # 160 // 16 steps, one log line each
    np.testing.assert_allclose(two_losses, one_losses, rtol=1e-5)
    assert val["val/examples"] == one_val["val/examples"] == 37  # 19 + 18 over the two processes
    np.testing.assert_allclose(val["val/loss"], one_val["val/loss"], rtol=1e-5)
