"""Two processes on loopback train like one; sweeps run, skip, resume and report."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from conftest import ROOT, digits_config, preempted_when

from attn_jax import data, train

SMALL = {"dataset.train_split": "train[:160]", "dataset.val_split": "train[1150:1187]",
         "dataset.test_split": "test[:20]", "batch_size": 16, "eval_batch_size": 16,
         "num_epochs": 1, "log_every_steps": 1, "preprocess.size": 16,
         "preprocess.train_resize": 18, "preprocess.crop": 16, "model.dim": 16}


def _config(data_dir, overrides=SMALL):
    return digits_config(data_dir, overrides)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(config, workdir):
    """One process on 8 devices: the training order does not depend on the process count."""
    train.train_and_evaluate(config, str(workdir))
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in records if "train/loss" in r], next(
        r for r in records if "val/loss" in r)


@pytest.mark.slow
@pytest.mark.parametrize("resident_limit_mib", [None, 0], ids=["resident", "streamed"])
def test_two_processes_match_one(tmp_path, digits_data_dir, resident_limit_mib):
    """Each process holds the split (resident) or reads its rows of every global batch (streamed)."""
    overrides = {**SMALL, "dataset.resident_limit_mib": resident_limit_mib}
    config = _config(digits_data_dir, overrides)
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
    one_losses, one_val = _reference(config, tmp_path / "reference")
    assert len(two_losses) == 10  # 160 // 16 steps, one log line each
    np.testing.assert_allclose(two_losses, one_losses, rtol=1e-5)
    assert val["val/examples"] == one_val["val/examples"] == 37  # 19 + 18 over the two processes
    np.testing.assert_allclose(val["val/loss"], one_val["val/loss"], rtol=1e-5)


def test_uneven_eval_shards_pad_to_the_same_batch_count(digits_data_dir):
    config = _config(digits_data_dir)
    split = data.load_split(config.dataset, "train[1150:1187]")
    assert [len(data.local_shard(37, i, 2)) for i in (0, 1)] == [19, 18]
    # Every process must run as many eval steps as the others, padding with masked examples.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jax, "process_count", lambda: 2)
        batches = [list(data.eval_batches(split, 8, i, 2)) for i in (0, 1)]
    assert [len(b) for b in batches] == [3, 3]
    assert sum(int(b["mask"].sum()) for shard in batches for b in shard) == 37
    labels = np.concatenate([b["labels"][b["mask"]] for shard in batches for b in shard])
    np.testing.assert_array_equal(labels, split.examples.read(np.arange(37))[1])  # each once


SWEEP_EXPERIMENT = """
from attn_jax.experiment import load_module


def get_config(arg=None):
    config = load_module({base!r}).get_config("smoke")
    config.dataset.data_dir = {data_dir!r}
    for key, value in {small!r}.items():
        section, _, leaf = key.rpartition(".")
        (config[section] if section else config)[leaf] = value
    config.optimizer.schedule = "constant"
    return config


def get_sweep(arg=None):
    return [{{"name": f"dim{{d}}-seed{{s}}", "model.dim": d, "seed": s}}
            for d in (8, 16) for s in (0, 1)][:{count}]
"""


def _write_sweep_experiment(path, data_dir, count):
    path.write_text(textwrap.dedent(SWEEP_EXPERIMENT.format(
        base=str(ROOT / "experiments" / "patch_convnet.py"), data_dir=str(data_dir),
        small={**SMALL, "log_every_steps": 5}, count=count)))


@pytest.mark.slow
def test_sweep_dry_run_prints_one_command_per_point(tmp_path, digits_data_dir):
    experiment = tmp_path / "exp.py"
    _write_sweep_experiment(experiment, digits_data_dir, 4)
    result = subprocess.run([sys.executable, "launch.py", f"--config={experiment}", "--sweep",
                             "--dry_run", f"--workdir={tmp_path / 'sweep'}", "--config.num_epochs=3"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4
    assert f"--workdir={tmp_path / 'sweep' / 'dim16-seed1'}" in lines[3]
    assert all("--config.num_epochs=3" in line and "--config.seed=" in line for line in lines)
    assert not (tmp_path / "sweep").exists()  # a dry run trains nothing


@pytest.mark.slow
def test_sweep_runs_skips_resumes_and_reports(tmp_path, digits_data_dir):
    from attn_jax import sweep

    experiment = tmp_path / "exp.py"
    _write_sweep_experiment(experiment, digits_data_dir, 2)
    workdir = tmp_path / "sweep"
    # Point 0 was preempted (SIGTERM) after one of its two epochs: its checkpoint is there.
    first = sweep.points(str(experiment))[0]
    config = _config(digits_data_dir, {**SMALL, "model.dim": 8, "seed": 0, "num_epochs": 2,
                                       "log_every_steps": 5})
    config.optimizer.schedule = "constant"
    with preempted_when(lambda step, scalars: "val/loss" in scalars):  # the end of epoch 1
        assert train.train_and_evaluate(config, str(workdir / first["name"])) is None

    result = subprocess.run([sys.executable, "launch.py", f"--config={experiment}", "--sweep",
                             f"--workdir={workdir}", "--config.num_epochs=2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sweep: resuming dim8-seed0" in result.stdout
    assert "resumed from the checkpoint at step 10" in result.stdout
    assert "sweep: starting dim8-seed1" in result.stdout
    rows = (workdir / "sweep.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("name,group,val/top1")
    report = (workdir / "sweep.md").read_text()
    assert "| model.dim=8 | 2 |" in report and "±" in report

    again = subprocess.run([sys.executable, "launch.py", f"--config={experiment}", "--sweep",
                            f"--workdir={workdir}", "--config.num_epochs=2"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.stdout.count("is finished, skipping") == 2


