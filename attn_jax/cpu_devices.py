"""How many JAX devices a CPU host is split into (`config.cpu_devices`), set before JAX starts.

XLA:CPU runs one device's program as a graph of ops on one pool of threads, one per core. Much of
these models' step is ops too small or too serial to keep every core busy: the chunked attentions'
small matmuls and softmax passes, LayerNorms, dropout masks. On the project's 2-core AMD EPYC
(AVX-512) the EANet train step's ops added up to 2,124 ms per step in 2,016 ms of wall time: about
one core's worth of work at a time. Split into two devices, each with half of the batch (data
parallelism inside the host, with the gradients averaged across the two as across hosts), the
runtime has two independent streams of ops for the two cores. Train steps, images/s, 1 device /
2 devices, alternating processes on that machine (`python launch.py --mode=benchmark`, float32,
batch 128; docs/performance.md, 2026-12-02): EANet 67.2, 65.1 / 72.7, 82.3; PatchConvNet 67.5,
63.2 / 70.2, 69.0; ViT 21.6 / 24.4. Four devices on the two cores ran as fast as two (85.0 against
86.3 for EANet).

`"auto"` therefore splits a host with at least two cores into `AUTO_DEVICES` = 2 devices, where the
batch divides over them; one core, or a batch that does not divide, keeps one device. Only two
cores were measured: on a larger CPU, `--config.cpu_devices=N` tries N. It applies to the CPU
backend only (a GPU or TPU host's accelerators are unaffected) and gives way to a device count
forced through `XLA_FLAGS=--xla_force_host_platform_device_count` (as the tests do). The result
is the same function of the same data up to float summation order: the batch, its dropout masks
(drawn per example from the global index) and the optimizer update do not depend on the split.
"""

import os

import jax
import ml_collections
from jax._src import xla_bridge

from attn_jax.errors import UserError

AUTO_DEVICES = 2
_FORCED = "--xla_force_host_platform_device_count"


def host_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve(setting: str, cores: int, batch_sizes: tuple[int, ...]) -> int:
    """config.cpu_devices -> the number of CPU devices: an integer as given; "auto" as above."""
    if setting != "auto":
        return int(setting)
    if cores < AUTO_DEVICES or any(size % AUTO_DEVICES for size in batch_sizes):
        return 1
    return AUTO_DEVICES


def split_host(config: ml_collections.ConfigDict) -> int | None:
    """Sets JAX's CPU device count from `config.cpu_devices` before the backends start; returns it,
    or None where it was left alone (forced by XLA_FLAGS, or JAX already started)."""
    if _FORCED in os.environ.get("XLA_FLAGS", "") or xla_bridge.backends_are_initialized():
        return None
    micro_batch = config.batch_size // config.get("accumulate_steps", 1)
    count = resolve(config.get("cpu_devices", "auto"), host_cores(),
                    (micro_batch, config.eval_batch_size))
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError as e:  # a JAX that cannot change it any more
        raise UserError(f"config.cpu_devices: could not split the CPU into {count} devices "
                        f"({e}); set --config.cpu_devices=1") from None
    return count
