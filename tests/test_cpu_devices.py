"""config.cpu_devices: how many JAX devices launch.py splits a CPU host into."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attn_jax import cpu_devices, run_record, train, validate
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


def test_auto_keeps_one_device_per_process_in_a_multi_process_run():
    assert cpu_devices.resolve("auto", 2, (128, 128), single_process=False) == 1
    assert cpu_devices.resolve("2", 2, (128, 128), single_process=False) == 2


@pytest.mark.parametrize("value", ["two", "0", ""])
def test_a_bad_count_is_refused_naming_the_field(value):
    config = load_module(ROOT / "experiments" / "eanet.py").get_config("smoke")
    with config.unlocked():
        config.cpu_devices = value
    with pytest.raises(UserError, match="config.cpu_devices"):
        validate.check(config)


def _split_in_a_fresh_process(env: dict) -> list[str]:
    """[split_host's answer, the device count JAX then has] in a new process, as launch.py runs."""
    code = ("import jax; from attn_jax import cpu_devices; from attn_jax.experiment import "
            "load_module; c = load_module('experiments/eanet.py').get_config('smoke'); "
            "n = cpu_devices.split_host(c); print(n, jax.device_count())")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=True).stdout.split()


def test_launch_splits_the_host_before_jax_starts():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    expected = cpu_devices.resolve("auto", cpu_devices.host_cores(), (64, 64))  # smoke batches
    assert _split_in_a_fresh_process(env) == [str(expected), str(expected)]


def test_a_device_count_forced_through_xla_flags_is_left_alone():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=3"}
    assert _split_in_a_fresh_process(env) == ["None", "3"]


@pytest.mark.parametrize("field, relaunched_with", [("cpu_devices", "1"),
                                                   ("host_memory", "system")])
def test_a_run_recorded_before_the_field_existed_resumes(tmp_path, field, relaunched_with):
    """cpu_devices and host_memory (attn_jax/host_memory.py) change how a run is carried out, not
    what it computes: a relaunch may change them, and a record written before the field existed is
    the same run."""
    config = load_module(ROOT / "experiments" / "eanet.py").get_config("smoke")
    mesh = train.create_mesh()
    run_record.check_and_record(tmp_path, config, mesh, resuming=False)
    record = json.loads((tmp_path / run_record.RECORD).read_text())
    del record["config"][field]
    (tmp_path / run_record.RECORD).write_text(json.dumps(record))
    with config.unlocked():
        config[field] = relaunched_with
    run_record.check_and_record(tmp_path, config, mesh, resuming=True)  # no error
