"""attn_jax/sweep.py through launch.py --sweep: a dry run, and a sweep that skips, resumes and reports."""

import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, SMALL_RUN, preempted_when, small_digits_config

from attn_jax import sweep, train

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
        small={**SMALL_RUN, "log_every_steps": 5}, count=count)))


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
    experiment = tmp_path / "exp.py"
    _write_sweep_experiment(experiment, digits_data_dir, 2)
    workdir = tmp_path / "sweep"
    # Point 0 was preempted (SIGTERM) after one of its two epochs: its checkpoint is there.
    first = sweep.points(str(experiment))[0]
    config = small_digits_config(digits_data_dir, {**SMALL_RUN, "model.dim": 8, "seed": 0,
                                                   "num_epochs": 2, "log_every_steps": 5})
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
