"""JAX's runtime as launch.py sees it: whether its backends have started, and the devices it found.

`backends_started` answers through JAX's public configuration alone: JAX has no public query for
it, and its internal one (`jax._src.xla_bridge.backends_are_initialized`) may move between releases.
"""

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
