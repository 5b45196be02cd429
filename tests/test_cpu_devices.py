"""config.cpu_devices: how many JAX devices launch.py splits a CPU host into."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from attn_jax import cpu_devices, validate
from attn_jax.errors import UserError
from attn_jax.experiment import load_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("setting, cores, batches, expected", [
    ("auto", 2, (128, 128), 2),
    ("auto", 16, (128, 128), 2),  # measured on two cores only: more is an explicit choice
    ("auto", 1, (128, 128), 1),  # one core: nothing to run in parallel
    ("auto", 2, (128, 75), 1),  # an eval batch that does not split: one device
    ("3", 2, (128, 128), 3),  # a count is taken as given
])
def test_auto_splits_two_cores_where_the_batches_divide(setting, cores, batches, expected):
    assert cpu_devices.resolve(setting, cores, batches) == expected


@pytest.mark.parametrize("value", ["two", "0", ""])
def test_a_bad_count_is_refused_naming_the_field(value):
    config = load_module(ROOT / "experiments" / "eanet.py").get_config("smoke")
    with config.unlocked():
        config.cpu_devices = value
    with pytest.raises(UserError, match="config.cpu_devices"):
        validate.check(config)


def test_a_device_count_forced_through_xla_flags_is_left_alone(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    config = load_module(ROOT / "experiments" / "eanet.py").get_config("smoke")
    assert cpu_devices.split_host(config) is None


def test_launch_splits_the_host_before_jax_starts():
    """In a fresh process without the tests' forced device count, as launch.py calls it."""
    code = ("import jax; from attn_jax import cpu_devices; from attn_jax.experiment import "
            "load_module; c = load_module('experiments/eanet.py').get_config('smoke'); "
            "n = cpu_devices.split_host(c); print(n, jax.device_count())")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    expected = cpu_devices.resolve("auto", cpu_devices.host_cores(), (64, 64))  # smoke batches
    assert out == [str(expected), str(expected)]
