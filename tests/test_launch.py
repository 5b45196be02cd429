"""launch.py as a user runs it: one-line errors with a non-zero status, and the summary mode."""

import subprocess
import sys

from conftest import ROOT


def _launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_summary_ends_with_the_tutorial_parameter_count():
    result = _launch("--config=experiments/patch_convnet.py", "--mode=summary")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "total params: 1,436,426"  # the tutorial's shared trunk block
    assert any(line.startswith("forward FLOPs per image") for line in lines)


def test_misspelled_config_key_is_one_line_and_exit_2():
    result = _launch("--config=experiments/patch_convnet.py", "--mode=summary",
                     "--config.model.dimm=3")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --config.model.dimm: no such config key (did you mean 'dim'?)")
    assert "Traceback" not in result.stderr
