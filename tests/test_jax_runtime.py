"""attn_jax.jax_runtime: whether JAX's backends started (public API only), and the devices found."""

import os
import subprocess
import sys
from pathlib import Path

import jax

from attn_jax import jax_runtime

ROOT = Path(__file__).resolve().parents[1]


def test_backends_started_is_false_until_jax_starts_and_changes_nothing():
    """In a fresh process: False before JAX starts, True after; the option it probes keeps its
    value, and the CPU device count set before the start is the one JAX uses."""
    code = ("import jax; from attn_jax.jax_runtime import backends_started as started; "
            "jax.config.update('jax_num_cpu_devices', 3); before = started(); "
            "n = jax.device_count(); print(before, started(), jax.config.jax_num_cpu_devices, n)")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out == ["False", "True", "3", "3"]


def test_the_devices_are_described_in_one_line():
    jax.devices()
    assert jax_runtime.backends_started()
    line = jax_runtime.describe_devices()
    assert line == f"JAX {jax.__version__} on cpu: 8 devices (cpu)"  # conftest's 8 CPU devices


def test_collective_timeouts_are_added_once_and_a_value_already_set_wins():
    warn, terminate = jax_runtime.COLLECTIVE_TIMEOUTS_S
    flags = jax_runtime.with_collective_timeouts("--xla_force_host_platform_device_count=2")
    assert flags.split() == ["--xla_force_host_platform_device_count=2",
                             f"--{warn}={jax_runtime.COLLECTIVE_TIMEOUTS_S[warn]}",
                             f"--{terminate}={jax_runtime.COLLECTIVE_TIMEOUTS_S[terminate]}"]
    assert jax_runtime.with_collective_timeouts(flags) == flags
    mine = f"--{terminate}=7"
    assert jax_runtime.with_collective_timeouts(mine).split() == [
        mine, f"--{warn}={jax_runtime.COLLECTIVE_TIMEOUTS_S[warn]}"]
