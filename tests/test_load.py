"""A busy machine slows a run down but never aborts it: XLA:CPU's collectives with several CPU
devices, and runs sharing the machine's cores."""

import contextlib
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

# An evaluation of a wide model on many small batches, on 2 CPU devices, beside processes that keep
# the cores busy: before the loop kept its calls in flight bounded, they queued on the devices until
# XLA:CPU's runtime deadlocked (32 calls queued on a device hold its few threads) and its collective
# timeout aborted the process. The timeouts here are a few seconds, so a deadlock fails quickly.
EVALUATION = """
import json, jax
jax.config.update("jax_num_cpu_devices", 2)
import numpy as np
from conftest import tiny_patch_convnet_config
from attn_jax import data, state, train
config = tiny_patch_convnet_config(**{"model.dim": 256})
mesh = train.create_mesh()
rng = np.random.default_rng(0)
split = data.Split("test", data.Arrays(rng.integers(0, 255, (2048, 16, 16, 3), np.uint8),
                                       rng.integers(0, 10, 2048).astype(np.int32)), (16, 16, 3), 0)
_, _, initial = state.initial_state(config, mesh, 10)
print(json.dumps(train.evaluate(train.jit_eval_step(config, mesh), initial, split, 8, mesh, None)))
"""
FAST_TIMEOUTS = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=2"
                 " --xla_cpu_collective_call_terminate_timeout_seconds=4")


@contextlib.contextmanager
def cpu_hogs(count: int):
    """`count` processes that spin on a core each, stopped at the end."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


@pytest.mark.slow
def test_an_evaluation_slower_than_its_input_does_not_deadlock_the_devices():
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}  # XLA's defaults
    env |= {"XLA_FLAGS": FAST_TIMEOUTS, "PYTHONPATH": str(ROOT / "tests")}
    with cpu_hogs(2):
        done = subprocess.run([sys.executable, "-c", EVALUATION], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1])["examples"] == 2048


# Small recipes on the digits: the tutorial PatchConvNet (two copies) and EANet, each a few seconds.
SMALL = {"dataset.train_split": "train[:480]", "dataset.val_split": "train[1150:1270]",
         "dataset.test_split": "test[:128]", "batch_size": 16, "eval_batch_size": 32,
         "num_epochs": 2, "log_every_steps": 10, "preprocess.size": 16,
         "preprocess.train_resize": 18, "preprocess.crop": 16, "model.dim": 16}
RUNS = {"patch_convnet_a": "patch_convnet", "patch_convnet_b": "patch_convnet", "eanet": "eanet"}
TIMING = ("train_images_per_s", "wall_time_s")


def _launch(experiment: str, workdir, data_dir) -> subprocess.Popen:
    """launch.py as a user runs it: the CPU split into devices as on any 2-core machine."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    overrides = [f"--config.{k}={v}" for k, v in SMALL.items()]
    return subprocess.Popen(
        [sys.executable, "launch.py", f"--config=experiments/{experiment}.py:smoke",
         f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}", *overrides],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _results(workdir) -> dict:
    summary = json.loads((workdir / "summary.json").read_text())
    return {k: v for k, v in summary.items() if k not in TIMING}


@pytest.mark.slow
def test_three_runs_at_once_each_end_as_alone(tmp_path, digits_data_dir):
    alone = {}
    for experiment in ("patch_convnet", "eanet"):
        run = _launch(experiment, tmp_path / f"alone_{experiment}", digits_data_dir)
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, err[-2000:]
        alone[experiment] = _results(tmp_path / f"alone_{experiment}")
    with cpu_hogs(1):  # and something else busy too: five processes on two cores
        runs = {name: _launch(experiment, tmp_path / name, digits_data_dir)
                for name, experiment in RUNS.items()}
        ends = {name: run.communicate(timeout=900) for name, run in runs.items()}
    for name, experiment in RUNS.items():
        assert runs[name].returncode == 0, ends[name][1][-2000:]
        assert _results(tmp_path / name) == alone[experiment], name
