"""JAX's runtime as launch.py sees it: whether its backends have started, the devices it found, and
how long XLA:CPU lets one device wait for another in a collective.

`backends_started` answers through JAX's public configuration alone: JAX has no public query for
it, and its internal one (`jax._src.xla_bridge.backends_are_initialized`) may move between releases.
"""

import os
from collections import Counter

import jax

# A public option that JAX lets change only until its backends start (it raises RuntimeError after
# that), and whose negative values all mean "unset" (the XLA flag decides the count)
_PROBE_OPTION = "jax_num_cpu_devices"


def backends_started() -> bool:
    """Whether JAX has started its backends, after which the CPU device count and the allocator its
    threads use are fixed. Judged without starting them: `jax_num_cpu_devices` is set to another
    negative ("unset") value and back, which JAX refuses once they have started."""
    current = getattr(jax.config, _PROBE_OPTION)
    probe = -2 if current != -2 else -3
    try:
        jax.config.update(_PROBE_OPTION, probe)
    except RuntimeError:
        return True
    jax.config.update(_PROBE_OPTION, current)
    return False


# XLA:CPU aborts the whole process when one device's part of a collective (the gradient all-reduce,
# the eval sums) waits for the others' longer than its timeouts: by default a warning after 20 s,
# the abort 40 s later. A busy machine can hold a device's part back that long (other processes'
# load, a compile on the runtime's few shared threads), so a run is given an hour: load slows it
# down but does not kill it, while a true hang still ends in XLA's message naming the collective.
# docs/operations.md#a-busy-machine
COLLECTIVE_TIMEOUTS_S = {"xla_cpu_collective_call_warn_stuck_timeout_seconds": 600,
                         "xla_cpu_collective_call_terminate_timeout_seconds": 3600}


def with_collective_timeouts(xla_flags: str) -> str:
    """`xla_flags` (XLA_FLAGS' value) with each of `COLLECTIVE_TIMEOUTS_S` it does not already set."""
    added = [f"--{name}={seconds}" for name, seconds in COLLECTIVE_TIMEOUTS_S.items()
             if f"--{name}=" not in xla_flags]
    return " ".join([xla_flags.strip(), *added]).strip()


def set_collective_timeouts() -> bool:
    """Sets `COLLECTIVE_TIMEOUTS_S` in XLA_FLAGS (a value already there wins), which XLA reads once
    when its backends start; returns False, changing nothing, if they have started."""
    if backends_started():
        return False
    os.environ["XLA_FLAGS"] = with_collective_timeouts(os.environ.get("XLA_FLAGS", ""))
    return True


def describe_devices() -> str:
    """One line naming the JAX version, backend and devices found (starts JAX's backends), e.g.
    "JAX 0.12.1 on gpu: 1 device (NVIDIA H100 80GB HBM3)" or, in a run of several processes,
    "JAX 0.12.1 on tpu: 16 devices (TPU v5 lite), 4 in this process of 4"."""
    devices = jax.devices()
    kinds = Counter(device.device_kind for device in devices)
    named = ", ".join(kind if len(kinds) == 1 else f"{count} x {kind}" for kind, count in kinds.items())
    line = (f"JAX {jax.__version__} on {jax.default_backend()}: {len(devices)} "
            f"device{'s' if len(devices) != 1 else ''} ({named})")
    if jax.process_count() > 1:
        line += f", {jax.local_device_count()} in this process of {jax.process_count()}"
    return line


def say_devices() -> None:
    """Prints `describe_devices()` once per run, from process 0."""
    line = describe_devices()
    if jax.process_index() == 0:
        print(line, flush=True)
