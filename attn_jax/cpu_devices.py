"""How many JAX devices a CPU host is split into (`config.cpu_devices`), set before JAX starts.

XLA:CPU runs one device's program as a graph of ops on one pool of threads, one per core. Much of
these models' step is ops too small or too serial to keep every core busy (the chunked attentions'
small matmuls and softmax passes, LayerNorms, dropout masks): one device's step keeps about one core
busy at a time. Split into two devices, each with half of the batch (data parallelism inside the
host, the gradients averaged across the two as across hosts), the runtime has two independent
streams of ops, one per core, and the train steps run faster
(docs/performance.md#two-devices-per-cpu-host).

The rule, `resolve`: "auto" splits a single-process run on a host of at least two cores into
`AUTO_DEVICES` = 2 devices where every batch divides over them, and keeps one device otherwise
(one core, a batch that does not divide, a multi-process run: those are unmeasured). Only two cores
were measured: on a larger CPU, `--config.cpu_devices=N` tries N. Only the CPU backend is affected
(a GPU or TPU host's accelerators are not), and a count already forced through `XLA_FLAGS`
(`--xla_force_host_platform_device_count`, as the tests do) or `JAX_NUM_CPU_DEVICES` wins. The
result is the same function of the same data up to float summation order (8 devices against 1 is
tested in tests/test_train.py): the batch, its dropout masks and the update do not depend on it.
"""

import os

import jax
import ml_collections

from attn_jax.errors import UserError
from attn_jax.jax_runtime import backends_started

AUTO_DEVICES = 2


def host_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve(setting: str, cores: int, batch_sizes: tuple[int, ...],
            single_process: bool = True) -> int:
    """config.cpu_devices -> the number of CPU devices. A count ("3") is taken as given; "auto" is
    `AUTO_DEVICES` for a single process on at least that many cores whose `batch_sizes` (each the
    examples one device-wide step splits: micro-batch, eval batch) all divide by it, else 1."""
    if setting != "auto":
        return int(setting)
    splits = (single_process and cores >= AUTO_DEVICES
              and all(size % AUTO_DEVICES == 0 for size in batch_sizes))
    return AUTO_DEVICES if splits else 1


def _forced() -> bool:
    """Whether the environment already fixes the CPU device count."""
    return ("--xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
            or "JAX_NUM_CPU_DEVICES" in os.environ)


def split_host(config: ml_collections.ConfigDict, single_process: bool = True) -> int | None:
    """Sets JAX's CPU device count from `config.cpu_devices` before the backends start; returns it,
    or None where it was left alone (fixed by the environment, or JAX already started)."""
    if _forced() or backends_started():
        return None
    micro_batch = config.batch_size // config.get("accumulate_steps", 1)  # validated to divide
    count = resolve(config.get("cpu_devices", "auto"), host_cores(),
                    (micro_batch, config.eval_batch_size), single_process)
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except (AttributeError, RuntimeError) as e:  # a JAX without the option, or already started
        raise UserError(f"config.cpu_devices: could not split the CPU into {count} devices "
                        f"({e}); set --config.cpu_devices=1") from None
    return count
