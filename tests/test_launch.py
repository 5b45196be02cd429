"""launch.py as a user runs it: one-line errors with a non-zero status, the summary mode, and every
mode run where TensorFlow is not installed."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image


def _launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_summary_ends_with_the_tutorial_parameter_count():
    result = _launch("--config=experiments/patch_convnet.py", "--mode=summary")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "total params: 1,436,426"  # the tutorial's shared trunk block
    assert any(line.startswith("forward FLOPs per image") for line in lines)


@pytest.mark.slow
def test_misspelled_config_key_is_one_line_and_exit_2():
    result = _launch("--config=experiments/patch_convnet.py", "--mode=summary",
                     "--config.model.dimm=3")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --config.model.dimm: no such config key (did you mean 'dim'?)")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args, line", [
    (["--config=experiments/nope.py", "--workdir=WORKDIR"],
     "error: --config: no such experiment file 'experiments/nope.py'"),
    (["--config=BROKEN", "--workdir=WORKDIR"],
     "error: --config: the experiment file BROKEN has a syntax error at line 1: invalid syntax"),
    (["--config=experiments/patch_convnet.py", "--workdir=FILE"],
     "error: --workdir=FILE is a file, not a directory: choose another --workdir"),
    (["--config=experiments/patch_convnet.py", "--workdir=WORKDIR", "--dry_run"],
     "error: --dry_run only applies to --sweep (it prints the sweep's commands): add --sweep or "
     "drop --dry_run"),
])
def test_bad_command_lines_are_one_line_before_any_work(tmp_path, args, line):
    paths = {"WORKDIR": str(tmp_path / "run"), "FILE": str(tmp_path / "a_file"),
             "BROKEN": str(tmp_path / "broken.py")}
    (tmp_path / "a_file").write_text("results\n")
    (tmp_path / "broken.py").write_text("def get_config(:\n")
    for name, path in paths.items():
        args, line = [a.replace(name, path) for a in args], line.replace(name, path)
    result = _launch(*args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [line]
    assert not (tmp_path / "run").exists() and (tmp_path / "a_file").read_text() == "results\n"


@pytest.mark.slow
def test_sigterm_during_benchmark_mode_is_one_line(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "launch.py", "--config=experiments/patch_convnet.py:smoke", "--mode=benchmark",
         f"--workdir={tmp_path / 'bench'}", "--config.benchmark.repeats=1000"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:  # wait until it is timing
        if line.startswith("train step compiled"):
            break
    process.send_signal(subprocess.signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + 15
    assert err.strip().splitlines() == [
        "received SIGTERM during --mode=benchmark: stopped before its results were written; nothing "
        "else changed"]
    assert not (tmp_path / "bench" / "benchmark.json").exists()


def _launch_in(args, env, timeout=300):
    """launch.py with `args`, in the environment `env`."""
    return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_training_runs_without_tensorflow(tmp_path, digits_data_dir, digits_tfrecord_dir,
                                          no_tensorflow_env):
    """No module that training, evaluation, attend or summary imports imports TensorFlow: a short
    run with its attention maps, its evaluation, --mode=attend and --mode=summary, each in a process
    where TensorFlow is not installed."""
    probe = subprocess.run([sys.executable, "-c", "import tensorflow"], env=no_tensorflow_env,
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'tensorflow'" in probe.stderr
    small = ["--config.dataset.train_split=train[:256]", "--config.num_epochs=1",
             "--config.model.dim=16", "--config.steps_per_call=4", "--config.attention_every_epochs=1"]
    common = ["--config=experiments/patch_convnet.py:smoke", f"--workdir={tmp_path / 'run'}",
              f"--config.dataset.data_dir={digits_data_dir}", *small]
    trained = _launch_in(common, no_tensorflow_env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "4 step(s) per call, training data on the devices" in trained.stdout
    assert (tmp_path / "run" / "summary.json").exists()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "run" / "attention" / "epoch_001.png").exists()
    evaluated = _launch_in([*common, "--mode=eval", "--checkpoint=latest"], no_tensorflow_env)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "test/top1" in evaluated.stdout
    image = tmp_path / "digit.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(image)
    attended = _launch_in([*common, "--mode=attend", f"--image={image}", "--checkpoint=latest"],
                          no_tensorflow_env)
    assert attended.returncode == 0, attended.stderr[-3000:]
    assert (tmp_path / "run" / "attend" / "digit.png").exists()
    summary = _launch_in([*common, "--mode=summary"], no_tensorflow_env)
    assert summary.returncode == 0 and "total params:" in summary.stdout, summary.stderr[-3000:]

    # A dataset prepared as TFRecord: one line saying how to convert it, exit status 2.
    refused = _launch_in(["--config=experiments/patch_convnet.py:smoke", f"--workdir={tmp_path / 'tf'}",
                          f"--config.dataset.data_dir={digits_tfrecord_dir}"], no_tensorflow_env)
    assert refused.returncode == 2
    error = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "prepared as TFRecord" in error[0]
    assert "python -m attn_jax.convert_dataset --name=sklearn_digits" in error[0]
