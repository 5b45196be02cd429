"""launch.py as a user runs it: one-line errors with a non-zero status, and the summary mode."""

import subprocess
import sys

import pytest
from conftest import ROOT


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
