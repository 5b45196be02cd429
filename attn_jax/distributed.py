"""Multi-process (multi-host) start-up: one call before anything else touches the devices.

Each process then sees every device of the job in `jax.devices()` (the mesh spans them all), reads
its own shard of every split (`attn_jax.data`) and contributes its local batch to the global one
with `jax.make_array_from_process_local_data`. Only process 0 writes logs and images; orbax writes
checkpoints collectively.
"""

import jax

from attn_jax.errors import UserError


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None, auto_detect: bool) -> None:
    """Joins the job described by the flags, or by the cluster's environment with `auto_detect`
    (TPU pods, SLURM, Open MPI, ... as JAX detects them). Does nothing for a single process."""
    explicit = (coordinator_address, num_processes, process_id)
    if not auto_detect and all(v is None for v in explicit):
        return
    if not auto_detect and any(v is None for v in explicit):
        raise UserError("multi-process runs need all of --coordinator_address, --num_processes "
                        "and --process_id (or --distributed to detect them from the cluster)")
    # CPU devices of different processes talk through gloo (accelerators use their own runtime).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        if auto_detect:
            jax.distributed.initialize()
        else:
            jax.distributed.initialize(coordinator_address=coordinator_address,
                                       num_processes=num_processes, process_id=process_id)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"could not join the multi-process job: {str(e).splitlines()[0]}") from None


def shutdown() -> None:
    """Leaves the multi-process job together with the other processes (a barrier), so that the
    coordinator exiting first does not abort the others. Does nothing for a single process."""
    if jax.process_count() > 1:
        jax.distributed.shutdown()
